"""Config sources: where a role's view of the mesh comes from (asyncio ring).

One async interface (:class:`sources.base.ConfigSource`: an initial snapshot, then change sets)
with the local file as the first implementation (:class:`sources.file.FileConfigSource`).
"""
