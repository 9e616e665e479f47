"""The mesh model: nodes, workloads, services, policies, as one snapshot."""
