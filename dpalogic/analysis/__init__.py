"""Analysis: order and comparison, decompilation, the lattice, the landscape."""
