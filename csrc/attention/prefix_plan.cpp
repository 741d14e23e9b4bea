// Prefix plan: see prefix_plan.h for the algorithm and its outputs.
//
// Cost: one pass hashing every full page (O(total tokens)), one hash-map
// lookup per page, linear passes over the tree. 10,000 prompts of 2,000
// tokens (page 16) take well under a second on one core (bench/attention/
// bench_prefix_plan.py measures it).
#include "prefix_plan.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <unordered_map>

#include "common/check.h"

namespace inferops::attention {

namespace {

struct Node {
  int32_t parent;
  int32_t depth;     // pages from the root
  int32_t count;     // requests whose full-page chain passes through this node
  int32_t owner;     // a request holding this page's tokens
};

inline uint64_t mix(uint64_t h) {  // splitmix64 finalizer
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  h ^= h >> 31;
  return h;
}

uint64_t page_hash(const int32_t* t, int n) {
  uint64_t h = 0x9e3779b97f4a7c15ull;
  for (int i = 0; i < n; ++i) h = mix(h ^ (static_cast<uint32_t>(t[i]) + 0x9e3779b97f4a7c15ull));
  return h;
}

}  // namespace

PrefixPlanOutput build_prefix_plan(const PrefixPlanInput& in) {
  INFEROPS_CHECK_ARG(in.page_size >= 1, "expected page_size >= 1, got ", in.page_size);
  INFEROPS_CHECK_ARG(in.num_requests >= 0 && in.num_requests < (int64_t(1) << 31),
                     "expected 0 <= num_requests < 2^31, got ", in.num_requests);
  INFEROPS_CHECK_ARG(in.min_shared_pages >= 1, "expected min_shared_pages >= 1, got ",
                     in.min_shared_pages);
  const int64_t N = in.num_requests;
  const int ps = in.page_size;
  for (int64_t r = 0; r < N; ++r) {
    const int64_t len = in.offsets[r + 1] - in.offsets[r];
    INFEROPS_CHECK_ARG(len >= 0 && len < (int64_t(1) << 31), "prompt ", r, " has length ", len);
    if (in.decode_lens) {
      INFEROPS_CHECK_ARG(in.decode_lens[r] >= 0, "expected decode_lens >= 0, got ",
                         in.decode_lens[r], " for request ", r);
    }
  }

  // 1. Trie over full pages. Node 0 is the root (empty prefix).
  std::vector<Node> nodes;
  nodes.reserve(1024);
  nodes.push_back({-1, 0, static_cast<int32_t>(N), -1});
  std::unordered_map<uint64_t, int32_t> children;
  children.reserve(static_cast<size_t>(std::min<int64_t>(in.offsets[N] / ps + 1, int64_t(1) << 26)));
  std::vector<int32_t> end_node(N, 0);
  for (int64_t r = 0; r < N; ++r) {
    const int32_t* t = in.tokens + in.offsets[r];
    const int64_t pages = (in.offsets[r + 1] - in.offsets[r]) / ps;
    int32_t node = 0;
    for (int64_t p = 0; p < pages; ++p) {
      const int32_t* page = t + p * ps;
      uint64_t key = mix(page_hash(page, ps) ^ (uint64_t(node) * 0xff51afd7ed558ccdull));
      // Probe until an exact match or a free key (hash collisions between
      // different pages are resolved by comparing tokens, never assumed away).
      while (true) {
        auto it = children.find(key);
        if (it == children.end()) {
          const int32_t id = static_cast<int32_t>(nodes.size());
          nodes.push_back({node, nodes[node].depth + 1, 0, static_cast<int32_t>(r)});
          children.emplace(key, id);
          node = id;
          break;
        }
        const Node& c = nodes[it->second];
        const int32_t* theirs = in.tokens + in.offsets[c.owner] + int64_t(c.depth - 1) * ps;
        if (c.parent == node && std::memcmp(theirs, page, sizeof(int32_t) * ps) == 0) {
          node = it->second;
          break;
        }
        key = mix(key + 1);
      }
      nodes[node].count += 1;
    }
    end_node[r] = node;
  }
  const int32_t num_nodes = static_cast<int32_t>(nodes.size());

  // 2. Flatten to one level (see prefix_plan.h). Children have larger ids than
  // parents, so a reverse sweep is bottom-up and a forward sweep top-down.
  //
  // A request joins at most one group: the deepest *open* node on its path,
  // gaining that node's depth in saved page reads, minus one depth per open
  // group (its first member reads the prefix anyway). Only "candidate" nodes
  // can be worth opening: shared (count >= 2), at least min_shared_pages deep,
  // and branching or ending a request (on a unary chain the deeper node has
  // the same joiners and saves more). F(w, k) = best saving inside w's
  // subtree when the deepest open ancestor is w's k-th candidate ancestor
  // (k = 0: the root, i.e. none open, depth 0):
  //   F(w, k) = max( sum_c F(c, k) + direct(w) * D_k,              w closed
  //                  sum_c F(c, cd(w)) + (direct(w) - 1) * depth(w) )  w open
  // where c are w's candidate children, direct(w) the requests whose nearest
  // candidate is w, D_k the k-th ancestor's depth and cd(w) w's candidate depth.
  std::vector<int32_t> ending(num_nodes, 0), nchildren(num_nodes, 0);
  for (int64_t r = 0; r < N; ++r) ending[end_node[r]] += 1;
  for (int32_t v = 1; v < num_nodes; ++v) nchildren[nodes[v].parent] += 1;
  std::vector<int32_t> cand_id(num_nodes, -1), nearest(num_nodes, 0);
  std::vector<int32_t> cands, cparent, cdepth;  // per candidate
  for (int32_t v = 0; v < num_nodes; ++v) {
    const bool is_cand = v == 0 || (nodes[v].count >= 2 && nodes[v].depth >= in.min_shared_pages &&
                                    (ending[v] > 0 || nchildren[v] != 1));
    const int32_t up = v == 0 ? -1 : nearest[nodes[v].parent];
    if (is_cand) {
      cand_id[v] = static_cast<int32_t>(cands.size());
      cands.push_back(v);
      cparent.push_back(up < 0 ? -1 : cand_id[up]);
      cdepth.push_back(up < 0 ? 0 : cdepth[cand_id[up]] + 1);
      nearest[v] = v;
    } else {
      nearest[v] = up;
    }
  }
  const int32_t C = static_cast<int32_t>(cands.size());
  std::vector<int64_t> direct(C, 0);
  for (int64_t r = 0; r < N; ++r) direct[cand_id[nearest[end_node[r]]]] += 1;
  std::vector<std::vector<int64_t>> childsum(C), F(C);
  std::vector<std::vector<char>> opens(C);
  std::vector<int64_t> anc_depth;
  for (int32_t w = 0; w < C; ++w) childsum[w].assign(cdepth[w] + 1, 0);
  for (int32_t w = C - 1; w >= 1; --w) {
    const int64_t d = nodes[cands[w]].depth;
    const int32_t cd = cdepth[w];
    anc_depth.assign(cd, 0);  // anc_depth[k]: depth of the k-th candidate ancestor
    for (int32_t a = cparent[w], k = cd - 1; a >= 0; a = cparent[a], --k) anc_depth[k] = nodes[cands[a]].depth;
    const int64_t open_val = childsum[w][cd] + (direct[w] - 1) * d;
    F[w].resize(cd);
    opens[w].resize(cd);
    for (int32_t k = 0; k < cd; ++k) {
      const int64_t closed = childsum[w][k] + direct[w] * anc_depth[k];
      opens[w][k] = open_val > closed;  // ties stay closed: fewer, larger groups
      F[w][k] = opens[w][k] ? open_val : closed;
      childsum[cparent[w]][k] += F[w][k];
    }
  }
  // Top-down: which candidates open, and each request's group root.
  std::vector<int32_t> pass_k(C, 0), open_anc(C, -1);
  for (int32_t w = 1; w < C; ++w) {
    const int32_t k = pass_k[cparent[w]];
    const bool open = opens[w][k];
    pass_k[w] = open ? cdepth[w] : k;
    open_anc[w] = open ? cands[w] : open_anc[cparent[w]];
  }
  std::vector<int32_t> group_of(num_nodes, -1);  // only read at requests' nearest candidates
  for (int32_t w = 0; w < C; ++w) group_of[cands[w]] = open_anc[w];
  std::vector<int32_t> members_of_root(num_nodes, 0);
  for (int64_t r = 0; r < N; ++r) {
    const int32_t g = group_of[nearest[end_node[r]]];
    if (g >= 0) members_of_root[g] += 1;
  }

  // 3. Order.
  auto ratio = [&](int64_t r) {
    const double prompt = double(std::max<int64_t>(1, in.offsets[r + 1] - in.offsets[r]));
    return (in.decode_lens ? double(in.decode_lens[r]) : 1.0) / prompt;
  };
  std::vector<int32_t> group_roots;
  std::unordered_map<int32_t, int32_t> group_index;
  std::vector<std::vector<int32_t>> members;
  std::vector<int32_t> singles;
  for (int64_t r = 0; r < N; ++r) {
    int32_t g = group_of[nearest[end_node[r]]];
    if (g >= 0 && members_of_root[g] < 2) g = -1;  // a group of one shares nothing
    if (g < 0) {
      singles.push_back(static_cast<int32_t>(r));
      continue;
    }
    auto [it, fresh] = group_index.emplace(g, static_cast<int32_t>(group_roots.size()));
    if (fresh) {
      group_roots.push_back(g);
      members.emplace_back();
    }
    members[it->second].push_back(static_cast<int32_t>(r));
  }
  auto by_ratio = [&](int32_t a, int32_t b) {
    const double ra = ratio(a), rb = ratio(b);
    return ra != rb ? ra > rb : a < b;  // deterministic
  };
  std::vector<double> group_key(members.size());
  for (size_t gi = 0; gi < members.size(); ++gi) {
    std::sort(members[gi].begin(), members[gi].end(), by_ratio);
    group_key[gi] = ratio(members[gi].front());
  }
  std::vector<int32_t> gorder(members.size());
  std::iota(gorder.begin(), gorder.end(), 0);
  std::sort(gorder.begin(), gorder.end(), [&](int32_t a, int32_t b) {
    return group_key[a] != group_key[b] ? group_key[a] > group_key[b]
                                        : members[a].front() < members[b].front();
  });
  std::sort(singles.begin(), singles.end(), by_ratio);

  PrefixPlanOutput out;
  out.num_tree_nodes = num_nodes;
  out.order.reserve(N);
  out.group_indptr.push_back(0);
  out.group_page_indptr.push_back(0);
  std::vector<int32_t> logical(num_nodes, -1);
  std::vector<int32_t> chain;
  for (int32_t gi : gorder) {
    const int32_t root = group_roots[gi];
    chain.clear();
    for (int32_t v = root; v > 0; v = nodes[v].parent) chain.push_back(v);
    std::reverse(chain.begin(), chain.end());
    for (int32_t v : chain) {
      if (logical[v] < 0) {
        logical[v] = static_cast<int32_t>(out.page_owner.size());
        out.page_owner.push_back(nodes[v].owner);
        out.page_index.push_back(nodes[v].depth - 1);
        out.page_refs.push_back(0);
      }
      out.page_refs[logical[v]] += static_cast<int32_t>(members[gi].size());
      out.group_pages.push_back(logical[v]);
    }
    for (int32_t r : members[gi]) {
      out.order.push_back(r);
      out.shared_len.push_back(nodes[root].depth * ps);
      out.prompt_len.push_back(static_cast<int32_t>(in.offsets[r + 1] - in.offsets[r]));
    }
    out.group_indptr.push_back(static_cast<int32_t>(out.order.size()));
    out.group_page_indptr.push_back(static_cast<int32_t>(out.group_pages.size()));
  }
  for (int32_t r : singles) {  // one group each, nothing shared
    out.order.push_back(r);
    out.shared_len.push_back(0);
    out.prompt_len.push_back(static_cast<int32_t>(in.offsets[r + 1] - in.offsets[r]));
    out.group_indptr.push_back(static_cast<int32_t>(out.order.size()));
    out.group_page_indptr.push_back(static_cast<int32_t>(out.group_pages.size()));
  }
  return out;
}

}  // namespace inferops::attention
