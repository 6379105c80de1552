"""``miles convert``: a Miles or slime launch script -> a commented run spec, and what became of every flag.

:func:`convert` reads the script (:mod:`miles.convert.bash`), places each flag
(:mod:`miles.convert.mapping`), writes the spec and the flag table
(:mod:`miles.convert.output`), and checks the spec the way ``miles validate``
does, so a user sees at once whether the result runs and how it is laid out.
"""

from miles.convert.output import Conversion, convert

__all__ = ["Conversion", "convert"]
