"""The CA client side, shared by every role that holds workload certificates: unary gRPC to
the CA, node credentials, credential directories, the certificate manager."""
