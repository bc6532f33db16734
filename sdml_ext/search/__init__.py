"""Search a gallery with a trained bundle: encode it with one modality's network, query it with
features of any modality of the same bundle, get top-k scores and ids back.

    import sdml_ext
    from sdml_ext.search import build_index, load_index

    bundle = sdml_ext.load("runs/digits")
    index = build_index(bundle, "fou", gallery_x, ids=gallery_ids, path="runs/fou.index")
    scores, ids = index.search(query_x, k=10, modality="kar")       # [nq, 10] each, best first

    index = load_index("runs/fou.index")                             # checksums verified
    index.search_codes(codes, k)                                     # common-space codes in

Exact cosine search by default (:func:`sdml_ext.ops.cosine_topk`, streaming the gallery in blocks
from its shard files, so it may be larger than memory); :func:`export_faiss` writes an
approximate faiss IVF/HNSW index for galleries past an exact-search budget. The command line is
``python -m sdml_ext.search``.
"""

from ..errors import InputTypeError, SearchIndexError
from .faiss_export import export_faiss, to_faiss
from .format import read_index_manifest
from .index import Hits, SearchIndex, build_index, load_index
from .quality import hit_quality
from .writer import IndexWriter

__all__ = [
    "Hits",
    "IndexWriter",
    "InputTypeError",
    "SearchIndex",
    "SearchIndexError",
    "build_index",
    "export_faiss",
    "hit_quality",
    "load_index",
    "read_index_manifest",
    "to_faiss",
]
