"""Zero-trust inputs of compile: ``MeshInputs``, the API keys and the mesh's services.

They live in ``controlplane/compile/inputs/mesh.py`` (identity produces them, compile reads
them, so they sit below both); this module keeps the old names for their importers.
"""

from __future__ import annotations

from controlplane.compile.inputs.mesh import ApiKeyDigests as ApiKeyDigests
from controlplane.compile.inputs.mesh import MeshInputs as MeshInputs
from controlplane.compile.inputs.mesh import mesh_services as mesh_services
