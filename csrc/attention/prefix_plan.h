// Prefix plan (BatchLLM): the global prefix tree of a batch, flattened to one
// level of sharing, and the order in which requests should run.
//
// Input: each request's prompt token ids (CSR: tokens + offsets), the page
// size, and optionally each request's expected decode length.
//
// 1. Tree. Requests are inserted page by page (full pages only) into a trie
//    keyed by (parent node, hash of the page's tokens); a hash hit is
//    confirmed by comparing the tokens, so the tree is exact. Node = one
//    page-aligned prefix; count = requests passing through it.
// 2. Flattening (one level, as BatchLLM does). A group is a tree node v whose
//    depth(v) pages its members share; a request belongs to at most one group
//    (the deepest open node on its path). A group of m requests saves
//    (m - 1) * depth(v) page reads per decode step versus reading every
//    request's prefix. A bottom-up dynamic program over the shared, branching
//    nodes picks the set of groups with the largest total saving (exact: the
//    tests compare it with brute force over all partitions of small batches);
//    groups share at least min_shared_pages pages. Nested sharing inside a
//    group is deliberately not exploited: it would need one more attention
//    level and merge per level.
// 3. Order. Groups run together; groups with a larger max decode/prompt
//    ratio come first, and within a group the larger ratios first
//    (BatchLLM's reordering: long-decoding requests start early). Requests
//    with no group come last, also by ratio.
//
// The partial last page of a shared prefix is not shared: those tokens stay in
// each request's own suffix. Physical pages are assigned later (Python,
// PrefixPlan.materialize) from the logical ids emitted here: shared page k is
// tree node k (nodes used by any group, numbered in first-use order), so two
// groups whose prefixes share ancestors store those pages once.
#pragma once

#include <cstdint>
#include <vector>

namespace inferops::attention {

struct PrefixPlanInput {
  const int32_t* tokens;   // all prompts back to back
  const int64_t* offsets;  // [num_requests + 1]
  int64_t num_requests;
  int32_t page_size;
  const int32_t* decode_lens;  // [num_requests] or nullptr (treated as 1)
  int32_t min_shared_pages;    // a group shares a prefix of at least this many pages
};

struct PrefixPlanOutput {
  std::vector<int32_t> order;             // [N] request index at each plan position
  std::vector<int32_t> group_indptr;      // [G + 1] over plan positions
  std::vector<int32_t> group_page_indptr; // [G + 1] over group_pages
  std::vector<int32_t> group_pages;       // logical shared page ids, root first
  std::vector<int32_t> shared_len;        // [N] shared tokens per plan position (multiple of page_size)
  std::vector<int32_t> prompt_len;        // [N]
  std::vector<int32_t> page_owner;        // [num_shared_pages] request index holding the page's tokens
  std::vector<int32_t> page_index;        // [num_shared_pages] page number within that request
  std::vector<int32_t> page_refs;         // [num_shared_pages] requests using the page
  int64_t num_tree_nodes = 0;
};

PrefixPlanOutput build_prefix_plan(const PrefixPlanInput& in);

}  // namespace inferops::attention
