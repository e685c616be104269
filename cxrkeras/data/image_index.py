"""The image files under a folder, searched recursively and confined to it (no path or link leads out)."""

import os

from cxrkeras.data.images import is_image_name
from cxrkeras.errors import DataError

OUTSIDE_ROOT = "outside the image root"  # the skip reason of a path or link that leads out of --images


def within(path, root):
    """True when the absolute path `path` is `root` or below it (both already resolved with realpath)."""
    return os.path.commonpath([path, root]) == root


class ImageIndex:
    """Image files under a folder, searched recursively (NIH unpacks to images_001/images/ … images_012/images/).

    by_name: CSV entries are file names found anywhere below (NIH); a name found twice is an error, or with
    duplicates="first" the first in sorted walk order is used and the others are listed in `duplicates`.
    Confined to the folder: a CSV path, absolute or relative, and a symbolic link (file or folder) are followed
    only when their real path stays under the folder's real path; anything else is refused as OUTSIDE_ROOT and
    never opened. Folder links outside are not searched (`outside_dirs` lists them); a link loop is walked once.
    """

    def __init__(self, root, by_name, duplicates="error"):
        if duplicates not in ("error", "first"):
            raise ValueError(f"duplicates must be 'error' or 'first', got {duplicates!r}")
        self.root = root
        self.by_name = by_name
        self.duplicates = []  # (name, kept path, other path) of image names found twice, with duplicates="first"
        if not os.path.isdir(root):
            raise DataError(f"images folder {root!r} not found: give the folder holding the images with --images")
        self.real_root = os.path.realpath(root)
        self.files = {}  # relative path → absolute path
        self.outside = set()  # relative paths of file links that lead outside the root
        self.outside_names = set()
        self.outside_dirs = []  # relative paths of folder links that lead outside the root (not searched)
        names = {}
        seen = {self.real_root}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            keep = []
            for name in sorted(dirnames):
                full = os.path.join(dirpath, name)
                real = os.path.realpath(full)
                if not within(real, self.real_root):
                    self.outside_dirs.append(os.path.relpath(full, root).replace(os.sep, "/"))
                elif real not in seen:  # a second link to a folder already walked (or a loop): once is enough
                    seen.add(real)
                    keep.append(name)
            dirnames[:] = keep
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                if os.path.islink(full) and not within(os.path.realpath(full), self.real_root):
                    self.outside.add(rel)
                    self.outside_names.add(name)
                    continue
                self.files[rel] = full
                if by_name:
                    if name in names and is_image_name(name):
                        if duplicates == "error":
                            raise DataError(f"image name {name!r} found twice under {root}: {names[name]} and "
                                            f"{full}; remove one copy")
                        self.duplicates.append((name, names[name], full))
                        continue  # the first in sorted walk order is kept
                    names[name] = full
        self.names = names

    def locate(self, path_text):
        """(absolute path, None) of a CSV path entry, or (None, reason): "file not found" or OUTSIDE_ROOT."""
        if self.by_name:
            name = os.path.basename(path_text)
            if name in self.names:
                return self.names[name], None
            return None, OUTSIDE_ROOT if name in self.outside_names else "file not found"
        if os.path.isabs(path_text):
            real = os.path.realpath(path_text)
            if not within(real, self.real_root):
                return None, OUTSIDE_ROOT
            rel = os.path.relpath(os.path.abspath(path_text), os.path.abspath(self.root)).replace(os.sep, "/")
            if rel in self.files:
                return self.files[rel], None
            return (path_text, None) if os.path.isfile(real) else (None, "file not found")
        rel = os.path.normpath(path_text).replace(os.sep, "/")
        if rel in self.files:
            return self.files[rel], None
        if rel == ".." or rel.startswith("../") or rel in self.outside:
            return None, OUTSIDE_ROOT
        full = os.path.join(self.root, rel)
        if os.path.lexists(full):  # e.g. below a folder link that leads out, or a second link to a walked folder
            if not within(os.path.realpath(full), self.real_root):
                return None, OUTSIDE_ROOT
            if os.path.isfile(full):
                return full, None
        return None, "file not found"

    def resolve(self, path_text):
        """Absolute path of a CSV path entry, or None when there is no such file under the root."""
        return self.locate(path_text)[0]

    def unlabelled(self, used_paths):
        """Image files here that no CSV row names."""
        used = set(used_paths)
        return sorted(full for rel, full in self.files.items() if is_image_name(rel) and full not in used)
