"""Write a bundle onto a mounted TF card and read every file back, on Linux, macOS and Windows.

Only the Python standard library is used here (ctypes for what `os` does not expose), so
`airbox-build write` runs on a Windows or macOS laptop with nothing else installed: no mtools, no
e2fsprogs, no admin rights.

What `write_card` does, in this order (nothing on the card changes before step 5):
 1. reads the bundle (an output folder with card/ and SHA256SUMS, or a card folder) and checks it:
    boot.scr and boot_emmc.scr present, no boot.scr.emmc/boot.scr.sd, no file of 4 GiB or more;
 2. finds what filesystem holds TARGET (Linux: /proc/self/mountinfo, else statfs f_type; macOS:
    statfs f_fstypename + `diskutil info`; Windows: GetVolumeInformationW) and refuses anything
    but FAT, with the way to format the card spelled out for the OS;
 3. lists the card, ignoring desktop metadata (`._*`, `.Spotlight-V100`, `.fseventsd`,
    `.Trashes`, `System Volume Information`, ...): files an older bundle left (stale chunks,
    `boot.scr.emmc`, `boot.scr.sd`, scripts) are to be removed; any other file means TARGET may
    not be the card at all, and nothing is touched;
 4. checks the bundle fits (in clusters, counting what the removals free);
 5. asks before removing stale files (or `--yes`), removes `boot.scr` first, then the stale
    files; files already on the card with the same sha256 (read back from the card) stay;
 6. copies the rest with a progress bar, `boot.scr` LAST: an interrupted write leaves a card
    without `boot.scr`, which U-Boot ignores, never a half-written bundle that it would flash;
 7. flushes every file to the card (fsync, F_FULLFSYNC on macOS, FlushFileBuffers on Windows);
 8. reads every file back and compares its sha256 with the bundle's, bypassing the page cache
    where the OS allows (O_DIRECT or posix_fadvise(DONTNEED) on Linux, F_NOCACHE on macOS,
    FILE_FLAG_NO_BUFFERING on Windows), so the bytes come from the card, not from memory; on a
    mismatch boot.scr is removed again, so a card that did not keep the bundle is never flashed.
"""

from builder.card.bundle import (
    MARKERS,
    Bundle,
    CardError,
    check_bundle,
    is_bundle_file,
    list_files,
    open_bundle,
)
from builder.card.compare import Difference, compare_with_bundle
from builder.card.fileio import copy_file, hash_uncached
from builder.card.volume import (
    Volume,
    eject_hint,
    format_hint,
    next_steps,
    parse_macos_statfs,
    probe_volume,
    read_mountinfo,
)
from builder.card.write import (
    CardState,
    SpaceCheck,
    WriteOptions,
    WriteResult,
    check_space,
    compare_card,
    normalize_target,
    write_card,
)

__all__ = [
    "MARKERS",
    "Bundle",
    "CardError",
    "CardState",
    "Difference",
    "SpaceCheck",
    "Volume",
    "WriteOptions",
    "WriteResult",
    "check_bundle",
    "check_space",
    "compare_card",
    "compare_with_bundle",
    "copy_file",
    "eject_hint",
    "format_hint",
    "hash_uncached",
    "is_bundle_file",
    "list_files",
    "next_steps",
    "normalize_target",
    "open_bundle",
    "parse_macos_statfs",
    "probe_volume",
    "read_mountinfo",
    "write_card",
]
