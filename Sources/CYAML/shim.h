#ifndef SCIM_EDGE_CYAML_SHIM_H
#define SCIM_EDGE_CYAML_SHIM_H
#include <yaml.h>
#endif
