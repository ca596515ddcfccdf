"""QuRating (Wettig et al. 2024): judge pairs of texts, train a rater, score a corpus, select by
quality, train on the selection.

Stages and the files that connect them (every stage is a command; every file is local):

1. **judgments** (``acadlm_plugins.qurating.judging``): pairs of text excerpts from a corpus, each
   judged by a judge LM for every criterion in both orders. Output: a jsonl file, one row per
   pair::

       {"pair_id": str, "text_a": str, "text_b": str, "source_a": str, "source_b": str,
        "domain_a": str, "domain_b": str,
        "doc_id_a": str | null, "doc_id_b": str | null,  # the excerpts' documents, if known
        "judgments": {criterion: p_b_better},      # p(B better than A), order-averaged, in [0, 1]
        "p_b_by_order": {criterion: [p_b_ab, p_b_ba]}}  # the judge's p(B) in each order

   A criterion the judge failed to answer for a pair is ``null`` there (the rater masks it and
   trains on the pair's other criteria) and absent from ``p_b_by_order``, which the summary's
   position bias is computed from (files written before it existed lack it, and the document
   ids; readers need only the first seven fields).

2. **rater** (``tune run acadlm_plugins/rater_recipe``): a torchtune decoder with one scalar head
   per criterion, trained with the Bradley-Terry loss on the judgments (per criterion: a pair
   counts only for the criteria it has and is confident on). Output: a folder with the
   backbone as a Hugging Face model folder (``model/``, its tokenizer included) and
   ``rater_heads.pt`` + ``rater.json`` (criteria names, pooling, head shapes, training summary).
   The recipe exports it as ``<output_dir>/rater``; a text is read as ``[BOS] + its tokens``.

3. **annotation** (``tune run acadlm_plugins/annotate_recipe``): every document of a corpus
   scored per criterion (chunks of N tokens, token-weighted mean). Output: parquet shards
   ``scores-<rank>-<NNNNN>.parquet`` with the input columns plus ``num_tokens`` and one float
   column per criterion named ``score_<criterion>``; a ``_done`` marker per finished shard.
   Both numbers are zero-padded to five digits and rank ``r`` scores a contiguous block of
   rows, so the shards sorted by name list the corpus in its original order. The marker is
   ``scores-<rank>-<NNNNN>._done``; a shard without one is unfinished. A document without
   tokens has ``num_tokens = 0`` and NaN scores. ``annotation.json`` appears when every shard is
   done (``annotation_plan.json`` records what the shards were scored from).

4. **selection** (``acadlm_plugins.qurating.selection``): documents sampled without
   replacement with p proportional to exp(z/tau) to a token budget, over the whole corpus or
   (``domain_field``) within each domain to its share of the budget. Output: the selected rows as
   jsonl/parquet (text, domain, id, scores) plus a report (JSON + PNG histograms).

5. **training**: ``acadlm_plugins.qurating.dataset.quality_selected_dataset`` is a dataset
   component for stock torchtune recipes.
"""

CRITERIA = ("writing_style", "required_expertise", "facts_and_trivia", "educational_value")
