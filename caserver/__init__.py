"""The CA role (`ztagent ca serve`): Istio's CreateCertificate over mTLS, node authorization,
the CA directory."""
