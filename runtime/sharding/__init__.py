"""The sharding core: placements, the bridge to DTensor's strategies, and the per-op plan that
the compiled rewrite and ``SequenceShard``'s eager dispatch share (no FX, no Dynamo)."""
