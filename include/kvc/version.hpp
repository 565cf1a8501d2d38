//! @file
//! Library version in CUB's MMMmmmpp layout: 0.1.0 is 000100.
#pragma once

#define KVC_VERSION_MAJOR 0
#define KVC_VERSION_MINOR 1
#define KVC_VERSION_PATCH 0
#define KVC_VERSION (KVC_VERSION_MAJOR * 100000 + KVC_VERSION_MINOR * 100 + KVC_VERSION_PATCH)
