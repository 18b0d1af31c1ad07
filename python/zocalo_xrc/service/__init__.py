"""The X-ray centring service: per-image spot counts in, centring results
out (``docs/wire-format.md`` §2-§4). Being built: the recipe envelopes
(:mod:`.recipe`) come first."""
