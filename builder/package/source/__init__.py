"""Open the vendor package in any form and give uniform, streaming access to its file set.

Forms (detected from the bytes, not the file name):
  dir      a folder holding the file set, or holding (at most two levels down) one folder that does
  tar      .tar / .tgz / .tar.gz / .tar.xz / .tar.bz2, any top folder (`sdcard/`, none, ...)
  zip      .zip, any top folder
  img      a whole-card image: MBR or GPT label (or a bare FAT volume), the file set on a FAT
           partition, read in place with mtools: no mount, no loop device, nothing unpacked
  img.zip  an .img inside a zip: a stored (uncompressed) member is read in place inside the zip,
           a deflated one is decompressed once to a sparse file in the work dir
  img.xz, img.gz  a compressed .img, decompressed once to a sparse file in the work dir

The file set is the one folder that holds both `boot.scr` and `boot_emmc.scr` (case-sensitive).
None, or several, is a PackageError naming what was found.

Cost model: a folder and a zip are random access. A tarball is not: opening it extracts the
whole archive in one streaming pass into the work dir, and members are served from there.
Everything written to the work dir lives under `source-<key>/`, where the key hashes the input's
path, size and mtime; a completed extraction or decompression is found and reused by a later
open of the same input (it is renamed into place only once complete).
"""

from builder.package.source.base import MARKERS, SUPPORTED_FORMS, is_os_junk
from builder.package.source.opener import detect_form, open_package
from builder.package.source.partitions import Partition, read_partitions
from builder.package.source.scratch import write_sparse
from builder.package.source.sources import DirSource, FatSource, PackageSource, ZipSource

__all__ = [
    "MARKERS",
    "SUPPORTED_FORMS",
    "DirSource",
    "FatSource",
    "PackageSource",
    "Partition",
    "ZipSource",
    "detect_form",
    "is_os_junk",
    "open_package",
    "read_partitions",
    "write_sparse",
]
