"""The GPU's two options: chunks that fit in its memory, and the head through torch.compile."""
import torch

from hpmkit.chunks import ChunkResult
from hpmkit.cli import CLIError


class MemoryFit:
    """Runs job(first, end) -> ChunkResult in parts of whole fixed batches when the GPU runs out
    of memory on a chunk of several: halved until it fits, and the size that fits kept for every
    later chunk of the same row. The results are the whole chunk's: each batch of a chunk gets
    the random numbers it gets alone, so parts give what the chunk gives. log: one line when a
    row's chunks shrink."""

    def __init__(self, log=print):
        self.log = log
        self.fits = {}  # row name -> most fixed batches per chunk known to fit (absent: no limit seen)

    def __call__(self, job, row_name, batches):
        """job on these fixed batches, wrapped: (first, end) -> ChunkResult."""
        def run(first, end):
            fits = self.fits.get(row_name)
            if fits and end - first > fits:
                return ChunkResult.join([run(a, min(a + fits, end)) for a in range(first, end, fits)])
            try:
                return job(first, end)
            except torch.cuda.OutOfMemoryError:
                if end - first == 1:
                    raise
            torch.cuda.empty_cache()  # (outside the except: its traceback no longer holds the tensors)
            fits = self.fits[row_name] = (end - first) // 2
            images = batches[first + fits][0] - batches[first][0]
            self.log(f"note: {row_name} ran out of GPU memory on "
                     f"{batches[end - 1][1] - batches[first][0]} images at once; chunks of "
                     f"at most {images} from here on (--chunk {images} starts there)")
            return run(first, end)
        return run


def compile_head(head):
    """--compile: the head's forward through torch.compile, in place (its state_dict unchanged),
    tried once at once: a machine that cannot compile fails here, in one line, not inside the
    first attack. An evaluation calls it in up to ~20 forms (modes, contexts, grouped or not,
    with or without gradients, new batch shapes): room for all, so that none runs eager."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, limit, max(getattr(config, limit), 64))
    head.compile()
    w = head.fc.weight
    try:
        with torch.no_grad():
            head(torch.zeros(2, w.shape[1], device=w.device, dtype=w.dtype))
    except Exception as e:
        while getattr(e, "inner_exception", None) or e.__cause__:  # the compiler's own error,
            e = getattr(e, "inner_exception", None) or e.__cause__  # not dynamo's wrapper
        first = (str(e).strip().splitlines() or [""])[0]
        raise CLIError(f"--compile: torch.compile fails on this machine ({type(e).__name__}: {first}); "
                       "run without --compile")
    return head
