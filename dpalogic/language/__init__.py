"""The language: formula text (grammar/preference.lark) and equation text, parsed into SymPy."""
