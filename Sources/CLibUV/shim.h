#ifndef SCIM_EDGE_CLIBUV_SHIM_H
#define SCIM_EDGE_CLIBUV_SHIM_H
#include <uv.h>
#include <signal.h>
#endif
