"""ImageFleet fleet manager: model, pure reconcile, providers, manager loop, local gateway.

Entry points: ``python -m fleet local ...`` (whole fleet on one machine) and
``python -m fleet run --config FILE`` (AWS). Embedding: :class:`fleet.local.runtime.LocalFleet`.
"""
