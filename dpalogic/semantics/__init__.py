"""Semantics: the log-space circuit IR, links, loss programs and the catalog of published losses."""
