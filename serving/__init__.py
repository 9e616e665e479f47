"""Shared operations plumbing for every role: HTTP admin server, JSON logging, access logs."""
