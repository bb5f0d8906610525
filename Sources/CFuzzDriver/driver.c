// Declarations only (see include/CFuzzDriver.h); this file gives the C target a source to build.
#include "CFuzzDriver.h"
