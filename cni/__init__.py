"""ztagent-cni: the chained CNI plugin that tells the node agent about each pod before its containers
start, and the agent's side of that conversation (see cni/README.md).

This file stays empty of imports: the plugin is exec'd once per pod by the container runtime and is
shipped as a zipapp of ``spec``, ``protocol`` and ``plugin`` only, so nothing here may pull in the
server (asyncio) or the installer.
"""
