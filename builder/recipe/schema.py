"""The table of every recipe key: type, default, allowed values, pattern and a one-line description.

Declared once, here. The parser takes each section's keys (allowed and required) and its defaults
from this table (`nodes.fields`, `Section.default`); the section parsers add the checks a table
cannot say (a gateway inside a configured subnet, a unit both enabled and disabled). From the same
table come the JSON Schema editors use (`airbox-build schema`, `docs/recipe.schema.json`) and the
README's recipe reference (`airbox-build schema --format markdown`); tests fail when either is out
of date.

To add a key: declare it in its section below, parse it in the section's parser (`load`, `users`,
`apps`, `network`, `system`, `devices`), add it to the dataclass in `model`, then regenerate the
docs (`scripts/gen-schema`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_UNSET: Any = object()


@dataclass(frozen=True)
class Type:
    """A value's type. `kind`: string, boolean, integer, size, any, section, map, list or union."""

    kind: str
    label: str  # how the reference names it: "device path", "sha256", "list of unit names"
    pattern: str | None = None  # anchored regular expression a string must match
    enum: tuple[Any, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    min_items: int = 0
    values: Type | None = None  # map values, list items
    key_pattern: str | None = None  # map keys
    options: tuple[Type, ...] = ()  # union members
    section: Section | None = None


@dataclass(frozen=True)
class Key:
    name: str
    type: Type
    doc: str
    required: bool = False
    default: Any = _UNSET  # as the recipe would write it; unset: nothing is written or changed
    missing: str | None = None  # the parser's own message when a required key is missing

    @property
    def has_default(self) -> bool:
        return self.default is not _UNSET


@dataclass(frozen=True)
class Section:
    """A mapping with known keys; `one_of`: groups of keys of which exactly one must be given."""

    keys: tuple[Key, ...]
    one_of: tuple[tuple[str, ...], ...] = ()
    min_keys: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)

    @property
    def required(self) -> tuple[Key, ...]:
        return tuple(k for k in self.keys if k.required)

    def key(self, name: str) -> Key:
        for k in self.keys:
            if k.name == name:
                return k
        raise KeyError(name)

    def default(self, name: str) -> Any:
        key = self.key(name)
        if not key.has_default:
            raise KeyError(f"{name} has no default")
        return key.default


def default(spec: Type, name: str) -> Any:
    """The table's default for a key of a section (as a recipe would write it)."""
    assert spec.section is not None, f"{spec.label} is not a section"
    return spec.section.default(name)


def keys_of(spec: Type) -> Section:
    assert spec.section is not None, f"{spec.label} is not a section"
    return spec.section


# ---------------------------------------------------------------------------------------------
# Value types
# ---------------------------------------------------------------------------------------------


def string(label: str = "string", pattern: str | None = None, enum: tuple[str, ...] = ()) -> Type:
    return Type("string", label, pattern=pattern, enum=enum)


def integer(label: str = "integer", minimum: int | None = None, maximum: int | None = None) -> Type:
    return Type("integer", label, minimum=minimum, maximum=maximum)


def section(label: str, *keys: Key, one_of: tuple[tuple[str, ...], ...] = (), min_keys: int = 0) -> Type:
    return Type("section", label, section=Section(keys, one_of, min_keys))


def map_of(label: str, key_pattern: str | None, values: Type) -> Type:
    return Type("map", label, key_pattern=key_pattern, values=values)


def list_of(label: str, item: Type, min_items: int = 0) -> Type:
    return Type("list", label, values=item, min_items=min_items)


def union(label: str, *options: Type) -> Type:
    return Type("union", label, options=options)


BOOL = Type("boolean", "true/false")
ANY = Type("any", "any value")
TEXT = string("text")
# Patterns the table gives editors and the parser compiles (builder.recipe.values): one of each.
NAME_PATTERN = r"^[a-z0-9._-]+$"
APP_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
SUITE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"
FAT_LABEL_PATTERN = r"^[A-Z0-9 _!#$%&'()@^`{}~-]{1,11}$"
LABEL_PATTERN = r"^[A-Z0-9_]+$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
MODE_PATTERN = r"^[0-7]{3,4}$"
PYTHON_PATTERN = r"^3\.[0-9]+(\.[0-9]+)?$"
PLATFORM_PATTERN = r"^[a-z0-9_]+$"
DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}(T[0-9:]+Z?)?$"
MAC_PATTERN = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"
ZONE_PATTERN = r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$"
LOCALE_PATTERN = r"^([A-Za-z]{1,8}(_[A-Za-z0-9]{2,3})?(\.[A-Za-z0-9-]+)?(@[A-Za-z0-9]+)?|C|POSIX)$"
UNIT_PATTERN = (
    r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?"
    r"\.(service|socket|device|mount|automount|swap|target|path|timer|slice|scope)$"
)
ACCOUNT_PATTERN = r"^([A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]+)$"
DEVICE_PATH = string("device path", r"^/")
LOCAL_PATH = string("local path")  # relative to the file that declares it
URL = string("http(s) URL", r"^https?://[^\s/?#]+")
SHA256 = string("sha256", r"^[0-9a-fA-F]{64}$")
MD5 = union("md5", string("md5", r"^[0-9a-fA-F]{32}$"), integer("md5 (all digits)"))
MODE = string("octal mode", MODE_PATTERN)
OWNER = string(
    "user or user:group", r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?(:[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?)?$"
)
UNIT = string("unit name", UNIT_PATTERN)
UNITS = list_of("list of unit names", UNIT)
IP = string("IP address", r"^[0-9A-Fa-f:.]+$")
CIDR = string("address/prefix", r"^[0-9A-Fa-f:.]+/[0-9]{1,3}$")
MAC = string("MAC address", MAC_PATTERN)
SIZE = union("size", integer("bytes", minimum=1), string("size", r"^\s*[0-9]+(\.[0-9]+)?\s*[A-Za-z]*\s*$"))
INPUT_SOURCES = ("url", "path", "parts")
BUNDLE_ID_MODES = ("auto", "always", "never")
SSH_HOST_KEYS = ("regenerate", "per-device", "keep")
MACHINE_ID = ("reset", "keep")
PERMIT_ROOT_LOGIN = ("yes", "no", "prohibit-password", "forced-commands-only")


def _input_keys(url: Type, what: str) -> tuple[Key, ...]:
    return (
        Key("url", url, f"download {what} from this URL"),
        Key("path", LOCAL_PATH, f"{what} is a local file"),
        Key(
            "parts",
            list_of("list of URLs or local files", TEXT, 1),
            f"{what} is these parts, joined in order",
        ),
        Key("sha256", SHA256, "checked after download; a plain http:// input needs sha256 or md5"),
        Key("md5", MD5, "checked after download (md5 alone warns: run `airbox-build lock`)"),
        Key("size", integer("bytes", minimum=0), "expected size in bytes, checked before downloading"),
    )


# ---------------------------------------------------------------------------------------------
# The sections
# ---------------------------------------------------------------------------------------------

BASE = section(
    "vendor package",
    *_input_keys(string("http(s) or file URL", r"^(https?|file)://"), "the vendor package"),
    Key("member", TEXT, "the package's path inside an SDK release archive holding more than one"),
    one_of=(INPUT_SOURCES,),
)
APT = section(
    "apt sources",
    Key("mirror", URL, "the Ubuntu ports mirror of the complete /etc/apt/sources.list", required=True),
    Key(
        "suites",
        list_of("list of suites", string("suite", SUITE_PATTERN), 1),
        "default: the image's codename, -updates, -backports and -security",
    ),
    Key(
        "components",
        list_of("list of components", string("component", SUITE_PATTERN), 1),
        "archive components",
        default=["main", "restricted", "universe", "multiverse"],
    ),
)
PIP = section(
    "pip index",
    Key("index_url", URL, "pip's index in /etc/pip.conf", required=True),
    Key(
        "trusted_host",
        union("host or list of hosts", TEXT, list_of("list of hosts", TEXT)),
        "default: the hosts of index_url and extra_index_urls",
    ),
    Key("extra_index_urls", list_of("list of URLs", URL), "more indexes"),
)
USER = section(
    "account",
    Key("ssh_authorized_keys", list_of("list of public key lines", TEXT), "~/.ssh/authorized_keys lines"),
    Key(
        "password_hash",
        string("crypt(3) hash", r"^(!?\$[A-Za-z0-9]+\$.+|[!*])$"),
        "a crypt(3) hash (`openssl passwd -6`); plaintext passwords are refused",
    ),
    Key("create", BOOL, "make the account when the image has none", default=False),
    Key("uid", integer("uid", 1, 65533), "default: the first free one from the image's /etc/login.defs"),
    Key(
        "groups", list_of("list of group names", string("group", ACCOUNT_PATTERN), 1), "supplementary groups"
    ),
    Key("shell", DEVICE_PATH, "login shell of a created account"),
    Key("home", DEVICE_PATH, "home of a created account (default /home/NAME)"),
    Key("lock", BOOL, "lock the password ('!' before the hash): no password login", default=False),
)
FILE = section(
    "file",
    Key("path", DEVICE_PATH, "where the file goes on the device", required=True),
    Key("content", TEXT, "the file's text (a Jinja2 template is `template`)"),
    Key("source", LOCAL_PATH, "copy this local file"),
    Key("template", LOCAL_PATH, "render this local Jinja2 template"),
    Key("url", URL, "download the file"),
    Key("sha256", SHA256, "of the downloaded file"),
    Key("md5", MD5, "of the downloaded file"),
    Key("size", integer("bytes", minimum=0), "of the downloaded file"),
    Key("mode", MODE, 'a quoted string of octal digits, e.g. "0600"', default="0644"),
    Key("owner", OWNER, "resolved in the image's passwd and group", default="root:root"),
    Key(
        "layer",
        string("layer", enum=("base", "overlay")),
        "overlay: write into ROOTFS_RW's upper layer instead of ROOTFS",
        default="base",
    ),
    one_of=(("content", "source", "template", "url"),),
)
OVERLAY = section(
    "overlay tree",
    Key("path", LOCAL_PATH, "a local folder laid out like the device; *.j2 files rendered", required=True),
    Key("owner", OWNER, "owner of every file and folder (default: root:root)"),
)
SERVICES = section(
    "services",
    Key("enable", UNITS, "units enabled by the links `systemctl enable` would make"),
    Key("disable", UNITS, "units whose enable links are removed"),
)
STRIP = Key(
    "strip_components", integer("count", 0, 64), "leading folders dropped from archive paths", default=0
)
APP_SOURCE = section(
    "app source",
    *_input_keys(URL, "the app's source archive"),
    STRIP,
    one_of=(INPUT_SOURCES,),
)
INNER_PATH = string("path inside the app folder", r"^[^/]")
MODEL = section(
    "model",
    *_input_keys(URL, "the model"),
    Key("dest", INNER_PATH, "copy the file here (relative to the app folder)"),
    Key("extract", string("path inside the app folder"), "unpack the archive here ('.' = the app folder)"),
    STRIP,
    one_of=(INPUT_SOURCES, ("dest", "extract")),
)
APP_PYTHON = section(
    "app Python environment",
    Key("lock", LOCAL_PATH, "the hashed pins for the target (`airbox-build lock` writes it)", required=True),
    Key("target", INNER_PATH, "where the packages go, relative to the app folder", default=".pydeps"),
    Key(
        "platform",
        string("wheel platform tag", PLATFORM_PATTERN),
        "wheel platform",
        default="manylinux2014_aarch64",
    ),
    Key(
        "python",
        string("Python version", PYTHON_PATTERN),
        "the box's Python (quoted)",
        default="3.8",
    ),
    Key("requirements", LOCAL_PATH, "the .in file `airbox-build lock` resolves the lock from"),
    Key(
        "exclude_newer",
        string("date", DATE_PATTERN),
        "resolve as of this date (uv --exclude-newer)",
    ),
    Key("wheels", LOCAL_PATH, "a local folder of wheels (offline builds)"),
    Key("index_url", URL, "where the wheels are downloaded from (default: pip's own, or the mirrors)"),
)
APP_SERVICE = section(
    "app service",
    Key("exec", TEXT, "the command line (one line)", required=True),
    Key("user", string("user", ACCOUNT_PATTERN), "default: the app owner's user, else root"),
    Key("port", integer("port", 1, 65535), "the port the app listens on (for `boot --check`)"),
    Key(
        "environment",
        map_of("variables", ENV_NAME_PATTERN, union("value", TEXT, integer(), BOOL)),
        "Environment= lines",
    ),
    Key("after", UNITS, "After= and Wants= units"),
    Key("name", UNIT, "the unit file's name (default: <app>.service)"),
    Key("enable", BOOL, "enable the unit", default=True),
)
APP = section(
    "app",
    Key("path", DEVICE_PATH, "the app's folder on the device", required=True),
    Key("owner", OWNER, "owner of the app's files (default: root:root)"),
    Key("source", APP_SOURCE, "the app's source archive, unpacked into the folder"),
    Key("models", list_of("list of models", MODEL), "model files and archives"),
    Key("python", APP_PYTHON, "an offline Python environment from a lock file"),
    Key("service", APP_SERVICE, "a systemd unit that runs the app"),
    Key("dirs", list_of("list of paths", INNER_PATH), "folders made even when empty"),
)
OUTPUT = section(
    "output",
    Key("image", BOOL, "also write <name>.img, a FAT32 card image", default=False),
    Key("zip", BOOL, "also write <name>.zip, the card files for release", default=False),
    Key("shrink", BOOL, "shrink edited ext4 images to their used size", default=True),
    Key(
        "volume_label",
        string("FAT volume label", FAT_LABEL_PATTERN),
        "label of the card image",
        default="AIRBOX",
    ),
    Key(
        "bundle_id",
        union("auto, always or never", string("mode", enum=BUNDLE_ID_MODES), BOOL),
        "write /etc/airbox-build.json: auto = when the build changes the image",
        default="auto",
    ),
)
IDENTITY_KEYS = section(
    "identity",
    Key(
        "ssh_host_keys",
        string("policy", enum=SSH_HOST_KEYS),
        "regenerate at first boot, per-device keys made by the build, or keep the image's",
        default="regenerate",
    ),
    Key(
        "machine_id",
        string("policy", enum=MACHINE_ID),
        "reset: an empty /etc/machine-id, made anew at first boot",
        default="reset",
    ),
)
IDENTITY = union("identity", string("keep", enum=("keep",)), IDENTITY_KEYS)

SSH = section(
    "sshd drop-in",
    Key("password_authentication", BOOL, "PasswordAuthentication"),
    Key(
        "permit_root_login",
        union(
            "true, false or a PermitRootLogin word",
            BOOL,
            string("word", enum=PERMIT_ROOT_LOGIN),
        ),
        "PermitRootLogin",
    ),
    min_keys=1,
)
HOST_PATTERN = (
    r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
ROUTE = section(
    "route",
    Key("to", string("network/prefix or default"), "destination", required=True),
    Key("via", IP, "gateway"),
    Key("from", IP, "source address"),
    Key("on-link", BOOL, "the gateway is on the link even outside the subnets"),
    Key("metric", integer("metric", 0), "route metric"),
    Key("table", integer("table", 0), "routing table"),
    Key("scope", string("scope", enum=("global", "link", "host")), "route scope"),
    Key("type", string("type", enum=("unicast", "unreachable", "blackhole", "prohibit")), "route type"),
)
NAMESERVERS_KEYS = section(
    "nameservers",
    Key("addresses", list_of("list of IP addresses", IP), "DNS servers"),
    Key("search", list_of("list of domains", TEXT), "search domains"),
)
NAMESERVERS = union("list of IPs or addresses/search", list_of("list of IP addresses", IP), NAMESERVERS_KEYS)
_COMMON = (
    Key("dhcp4", BOOL, "DHCP for IPv4"),
    Key("dhcp6", BOOL, "DHCP for IPv6"),
    Key("addresses", list_of("list of address/prefix", CIDR), "static addresses, e.g. 192.168.150.1/24"),
    Key("gateway4", IP, "IPv4 gateway, inside a configured subnet"),
    Key("gateway6", IP, "IPv6 gateway"),
    Key("nameservers", NAMESERVERS, "DNS servers (and search domains)"),
    Key("optional", BOOL, "boot does not wait for this link"),
    Key("mtu", integer("bytes", 68, 65535), "MTU"),
    Key("macaddress", MAC, "set this MAC address"),
    Key("routes", list_of("list of routes", ROUTE), "static routes"),
)
MATCH = section(
    "match",
    Key("name", TEXT, "interface name (glob)"),
    Key("macaddress", MAC, "MAC address"),
    Key("driver", TEXT, "kernel driver (glob)"),
    min_keys=1,
)
ETHERNET = section(
    "ethernet",
    *_COMMON,
    Key("match", MATCH, "match the device by name, MAC or driver"),
    Key("set-name", TEXT, "rename the matched device"),
)
BOND_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": (
        "balance-rr",
        "active-backup",
        "balance-xor",
        "broadcast",
        "802.3ad",
        "balance-tlb",
        "balance-alb",
    ),
    "lacp-rate": ("slow", "fast"),
    "transmit-hash-policy": ("layer2", "layer3+4", "layer2+3", "encap2+3", "encap3+4"),
    "ad-select": ("stable", "bandwidth", "count"),
    "arp-validate": ("none", "active", "backup", "all"),
    "arp-all-targets": ("any", "all"),
    "fail-over-mac-policy": ("none", "active", "follow"),
    "primary-reselect-policy": ("always", "better", "failure"),
}
BOND_NUMBERS = ("min-links", "gratuitous-arp", "packets-per-slave", "resend-igmp")
BOND_DURATIONS = ("mii-monitor-interval", "arp-interval", "up-delay", "down-delay", "learn-packet-interval")
DURATION = union(
    "milliseconds, or e.g. 100ms / 1s", integer("ms", 0), string("duration", r"^\s*[0-9]+(ms|s)?\s*$")
)
BOND_PARAMETERS = section(
    "bond parameters",
    *(Key(k, string(k, enum=v), f"bonding {k}") for k, v in BOND_CHOICES.items()),
    *(Key(k, integer("count", 0), f"bonding {k}") for k in BOND_NUMBERS),
    *(Key(k, DURATION, f"bonding {k}") for k in BOND_DURATIONS),
    Key("all-slaves-active", BOOL, "deliver duplicate frames from inactive members"),
    Key("arp-ip-targets", list_of("list of IPv4 addresses", IP), "ARP monitor targets"),
    Key("primary", TEXT, "the preferred member (one of `interfaces`)"),
)
BOND = section(
    "bond",
    *_COMMON,
    Key(
        "interfaces",
        list_of("list of interface names", TEXT, 1),
        "the ethernets it bonds",
        required=True,
        missing="a bond needs `interfaces`: the ethernets it bonds",
    ),
    Key("parameters", BOND_PARAMETERS, "bonding parameters"),
)
IFACE_ID = r"^[^/]+$"
NETWORK = section(
    "netplan",
    Key("version", Type("integer", "2", enum=(2,)), "netplan version: 2", default=2),
    Key("renderer", string("renderer", enum=("networkd", "NetworkManager")), "netplan renderer"),
    Key("ethernets", map_of("ethernets by id", IFACE_ID, ETHERNET), "ethernet interfaces"),
    Key("bonds", map_of("bonds by id", IFACE_ID, BOND), "bonds"),
)

# The top level. `extends` and `devices` are taken off before the sections are parsed.
_TOP = (
    Key("name", string("name", NAME_PATTERN), "the bundle's name: output/<name>/", required=True),
    Key("description", TEXT, "free text", default=""),
    Key("extends", LOCAL_PATH, "a recipe this one is deep-merged over (this file wins)"),
    Key("base", BASE, "the vendor package: URL, local file or folder, or parts", required=True),
    Key("vars", map_of("variables", None, ANY), "for templates: {{ vars.NAME }}"),
    Key("hostname", string("hostname", HOST_PATTERN), "/etc/hostname and /etc/hosts' 127.0.1.1 line"),
    Key("network", NETWORK, "netplan, replacing /etc/netplan/01-netcfg.yaml"),
    Key("apt", APT, "a complete /etc/apt/sources.list"),
    Key("pip", PIP, "/etc/pip.conf"),
    Key("users", map_of("accounts by name", ACCOUNT_PATTERN, USER), "accounts changed or created"),
    Key(
        "files",
        list_of("list of files", FILE),
        "files written (exactly one of content, source, template, url)",
    ),
    Key("overlays", list_of("list of trees", OVERLAY), "local trees laid over the device's root"),
    Key("remove", list_of("list of device paths", DEVICE_PATH), "paths removed from the image"),
    Key("services", SERVICES, "systemd units enabled and disabled"),
    Key("apps", map_of("apps by name", APP_NAME_PATTERN, APP), "preinstalled applications"),
    Key(
        "layout",
        map_of("sizes by partition label", LABEL_PATTERN, SIZE),
        "partition sizes, e.g. DATA: 12GiB",
    ),
    Key("mirrors", map_of("replacements by URL prefix", r"^https?://", URL), "download URL rewrites"),
    Key("output", OUTPUT, "what the build writes beside card/"),
    Key("identity", IDENTITY, "first-boot identity: host keys and machine-id (`keep` keeps the image's)"),
    Key("ssh", SSH, "an sshd_config drop-in"),
    Key("timezone", string("zone", ZONE_PATTERN), "/etc/localtime, /etc/timezone"),
    Key(
        "locale",
        string("locale", LOCALE_PATTERN),
        "/etc/default/locale",
    ),
    Key("ntp", list_of("list of hosts or IPs", TEXT, 1), "a systemd-timesyncd drop-in"),
)
# What a device may change: all but what the whole fleet shares (the vendor package, the layout,
# the download mirrors, the output forms and the fleet's name).
_FLEET_SHARED = ("name", "extends", "base", "layout", "mirrors", "output", "devices")
DEVICE = section(
    "device",
    Key("name", string("device name", NAME_PATTERN), "the device's name: its bundle's folder", required=True),
    *(k for k in _TOP if k.name not in _FLEET_SHARED),
)
RECIPE = section(
    "recipe",
    *_TOP,
    Key(
        "devices",
        union("list of devices or a CSV file", list_of("list of devices", DEVICE, 1), LOCAL_PATH),
        "a fleet: one bundle per device, each a fragment merged over the recipe",
    ),
)


def walk(t: Type, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Key]]:
    """Every key under a type, depth first, with its path (`<id>` for map keys, `[]` for items)."""
    if t.section is not None:
        for key in t.section.keys:
            yield (*path, key.name), key
            yield from walk(key.type, (*path, key.name))
    elif t.kind == "map" and t.values is not None:
        yield from walk(t.values, (*path, "<name>"))
    elif t.kind == "list" and t.values is not None:
        yield from walk(t.values, (*path, "[]"))
    for option in t.options:
        yield from walk(option, path)
