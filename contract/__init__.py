"""The artifact contract: what every stage agrees on, with the standard library and numpy alone.

The bottom layer of the project (docs/design.md#layering): the one exception type
(`contract.errors`), atomic writes and hashes (`contract.files`), the manifest schema
(`contract.manifest`), the tolerance table (`contract.tolerances`), the D4RL normalised
score (`contract.scores`), library versions (`contract.versions`) and the graph-node roles
that the precision passes share (`contract.graph_roles`). It imports nothing else of the
project, so the robot-side runtime can stand on it without torch.
"""
