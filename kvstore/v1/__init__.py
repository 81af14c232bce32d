"""Generated gRPC stubs of proto/kvstore/v1 land here at build time (never edited by hand)."""
