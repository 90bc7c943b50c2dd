#ifndef SCIM_EDGE_CLDAP_SHIM_H
#define SCIM_EDGE_CLDAP_SHIM_H
#include <ldap.h>

// LDAP_SASL_SIMPLE is a cast macro ((char *)0) that Swift does not import:
// a simple bind through ldap_sasl_bind_s, named.
static inline int scim_edge_ldap_simple_bind(LDAP *ld, const char *dn, struct berval *password) {
    return ldap_sasl_bind_s(ld, dn, LDAP_SASL_SIMPLE, password, NULL, NULL, NULL);
}
#endif
