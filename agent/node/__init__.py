"""The node agent (`ztagent run`): see agent.node.agent."""

from agent.node.agent import AgentOptions, NodeAgent, StartupError

__all__ = ["AgentOptions", "NodeAgent", "StartupError"]
