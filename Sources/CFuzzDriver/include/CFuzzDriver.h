// libFuzzer's documented entry for programs that have their own main (LLVM 12 and later). It is
// only referenced when qconvert-fuzz is built with -DQCONVERT_FUZZ and -sanitize=fuzzer (make fuzz).
#ifndef CFUZZDRIVER_H
#define CFUZZDRIVER_H
#include <stddef.h>
#include <stdint.h>
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));
#endif
