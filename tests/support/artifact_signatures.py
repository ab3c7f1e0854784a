"""Training artifacts as an older coordinator built them: some signatures taken out of one.

No TensorFlow: flatbuffers and ai-edge-litert's schema only. A test helper, kept out of the
installed package; pytest finds it through ``pythonpath``.
"""

from __future__ import annotations


def without(artifact: bytes, *keys: str) -> bytes:
    """``artifact`` without the signatures ``keys``, as a coordinator older than them built it."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    tree = schema.ModelT.InitFromPackedBuf(artifact, 0)
    tree.signatureDefs = [s for s in tree.signatureDefs if s.signatureKey.decode() not in keys]
    builder = flatbuffers.Builder(len(artifact))
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
