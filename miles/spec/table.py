"""How every spec table is declared: keyword-only, frozen, with slots.

Keyword-only because the loader and ``--set`` build tables from TOML keys, never
by position; frozen because a spec, once checked by its rules, is what the whole
run reads; slots so that a mistyped attribute is an error, not a new field.
"""

TABLE_ARGS = {"kw_only": True, "frozen": True, "slots": True}
"""The ``@dataclass`` arguments of every table: ``@dataclass(**TABLE_ARGS)``."""
