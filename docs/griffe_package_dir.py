"""A griffe extension for the API pages: subpackages that live outside their parent's folder.

setup.cfg installs the top-level ``guides/`` folder as ``pyro_lora.guides`` (``package_dir``), which griffe's
static analysis cannot see: it looks for ``pyro_lora/guides/``. It also skips a folder without
``__init__.py`` inside a regular package. This extension visits each configured folder as the named
subpackage of its parent (relative imports resolve against the real module path), so the API pages show
``pyro_lora.guides.laplace.LaplaceGuide`` with its source. mkdocs.yml configures it::

    extensions:
      - docs/griffe_package_dir.py:PackageDir:
          packages: {pyro_lora.guides: guides}

Folders are relative to the repository root (this file's parent's parent). Only griffe's public API is used.
"""

from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parent.parent


class PackageDir(griffe.Extension):
    """Attach ``{dotted.name: folder}`` subpackages to their parent package once it is loaded."""

    def __init__(self, packages=None):
        super().__init__()
        self.packages = dict(packages or {})

    def on_package(self, *, pkg, loader, **kwargs):  # griffe >= 2
        self._attach(pkg, loader)

    def on_package_loaded(self, *, pkg, loader, **kwargs):  # griffe 1.x name of the same event
        self._attach(pkg, loader)

    def _attach(self, pkg, loader):
        # shallow names first, so a parent exists before its children
        for name, folder in sorted(self.packages.items(), key=lambda item: item[0].count(".")):
            parent_path, _, child = name.rpartition(".")
            if name.split(".", 1)[0] != pkg.name or not parent_path:
                continue
            parent = pkg if parent_path == pkg.path else pkg.get_member(parent_path.split(".", 1)[1])
            if child in parent.members:  # griffe found it itself (e.g. an installed, non-editable copy)
                continue
            path = (ROOT / folder).resolve()
            if not path.is_dir():
                raise FileNotFoundError(f"griffe_package_dir: {name} -> {path} is not a folder")
            parent.set_member(child, self._visit_folder(child, path, parent, loader))

    def _visit_folder(self, name, folder, parent, loader):
        init = folder / "__init__.py"
        if init.exists():
            module = self._visit_file(name, init, parent, loader)
        else:  # a namespace folder: a module without code
            module = griffe.Module(name, filepath=[folder], parent=parent)
        for path in sorted(folder.iterdir()):
            if path.suffix == ".py" and path.stem != "__init__":
                module.set_member(path.stem, self._visit_file(path.stem, path, module, loader))
            elif path.is_dir() and (path / "__init__.py").exists():
                module.set_member(path.name, self._visit_folder(path.name, path, module, loader))
        return module

    @staticmethod
    def _visit_file(name, path, parent, loader):
        code = path.read_text(encoding="utf-8-sig")
        loader.lines_collection[path] = code.splitlines(keepends=False)
        return griffe.visit(
            name,
            filepath=path,
            code=code,
            extensions=loader.extensions,
            parent=parent,
            docstring_parser=loader.docstring_parser,
            docstring_options=loader.docstring_options,
            lines_collection=loader.lines_collection,
            modules_collection=loader.modules_collection,
        )
