#ifndef SCIM_EDGE_CHTTPPARSER_SHIM_H
#define SCIM_EDGE_CHTTPPARSER_SHIM_H
#include <http_parser.h>
#include <stdint.h>

/* http_parser keeps its state in bitfields; read them through functions so the
   Swift side never depends on how the C compiler laid them out. */
static inline unsigned int edge_hp_errno(const http_parser *p) { return p->http_errno; }
static inline unsigned int edge_hp_method(const http_parser *p) { return p->method; }
static inline unsigned int edge_hp_status(const http_parser *p) { return p->status_code; }
static inline unsigned int edge_hp_flags(const http_parser *p) { return p->flags; }
static inline unsigned int edge_hp_upgrade(const http_parser *p) { return p->upgrade; }
static inline uint64_t edge_hp_content_length(const http_parser *p) { return p->content_length; }
static inline int edge_hp_uses_transfer_encoding(const http_parser *p) { return p->uses_transfer_encoding; }
#endif
