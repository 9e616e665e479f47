"""Generated protobuf/gRPC modules for istio.v1.auth (see ca.proto and regen.sh)."""
