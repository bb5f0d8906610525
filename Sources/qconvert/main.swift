import QConvertKit
print("stub")
