"""Certificate authority server, client and the agent-side certificate manager."""
