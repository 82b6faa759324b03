"""`python -m leanvlp.data --num-images 1000 --out DIR`: build the embedded shapes dataset, print its statistics and
save a sample grid. (The package's own entry point: running `leanvlp.data.shapes` as `__main__` would execute a
module the package has already imported, which runpy warns about.)"""

from .shapes import main

main()
