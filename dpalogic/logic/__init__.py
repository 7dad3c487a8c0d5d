"""Logic: preference structures (P, P_C, P_A), their sides ✓ and ✗, truth tables."""
