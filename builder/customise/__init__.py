"""Customisation steps, one per recipe section; each returns at once when its section is empty."""

from __future__ import annotations

from collections.abc import Callable

from builder.customise.apps import apps
from builder.customise.context import Customiser
from builder.customise.files import files, overlays, remove
from builder.customise.identity import identity
from builder.customise.services import services
from builder.customise.sshd import default_passwords, ssh
from builder.customise.system import apt, hostname, network, pip
from builder.customise.timelocale import locale, ntp, timezone
from builder.customise.users import users

Step = Callable[[Customiser], None]

# Order matters where sections touch the same files: removals first, so a recipe can
# remove a vendor file and lay its own in its place; explicit files last among writes.
STEPS: tuple[tuple[str, Step], ...] = (
    ("remove", remove),
    ("identity", identity),
    ("hostname", hostname),
    ("network", network),
    ("apt", apt),
    ("pip", pip),
    ("users", users),
    ("ssh", ssh),
    ("timezone", timezone),
    ("locale", locale),
    ("ntp", ntp),
    ("overlays", overlays),
    ("files", files),
    ("apps", apps),
    ("services", services),
    ("default passwords", default_passwords),  # a check of the result: reads, writes nothing
)


def needs_customising(c: Customiser) -> bool:
    r = c.recipe
    return bool(
        r.output.bundle_id == "always"
        or r.identity.ssh_host_keys != "keep"
        or r.identity.machine_id != "keep"
        or r.ssh
        or r.timezone
        or r.locale
        or r.ntp
        or r.hostname
        or r.network
        or r.apt
        or r.pip
        or r.users
        or r.files
        or r.overlays
        or r.remove
        or r.services.enable
        or r.services.disable
        or r.apps
    )


def customise(c: Customiser) -> None:
    for _name, step in STEPS:
        step(c)
