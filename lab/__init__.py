"""The embedded default: a whole mesh of network-namespace nodes and pods on one host."""
