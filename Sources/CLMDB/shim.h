#ifndef SCIM_EDGE_CLMDB_SHIM_H
#define SCIM_EDGE_CLMDB_SHIM_H
#include <lmdb.h>
#endif
