"""llmos.services.kg: the knowledge graph engine (a library; the service wraps it).

Entry points: ``GraphStore`` (named, durable, per-user graphs) and ``KgError``.
"""
from llmos.services.kg.errors import KgError
from llmos.services.kg.graph import GraphStore

__all__ = ["GraphStore", "KgError"]
