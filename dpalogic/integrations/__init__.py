"""Adapters that plug dpalogic losses into other training libraries (imported on demand, e.g. ``.trl``)."""
