"""Kubernetes API conventions every parser shares: object names, namespaces, label keys and values
(one set of rules for the config file, the policy documents and the Kubernetes source)."""
