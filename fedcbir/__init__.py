"""fedcbir's job drivers: the ``fedcbir`` umbrella command and the commands that run whole jobs
(``demo``, ``study``, ``simulate``).  They sit above every other package and nothing but the
command-line entry points imports them; the shared base is ``common``."""

from common import __version__  # noqa: F401 - `fedcbir --version`
