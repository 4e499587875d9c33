"""Generated protobuf and gRPC code for the psgrid.v1 API (see scripts/gen_protos.py)."""
