#pragma once
// How the CPU backend cuts a grouped product into tiles of C: for every
// expert, its rows in near-equal row tiles (or one, for the weight gradients,
// whose rows are the sum), times near-equal column tiles. The boundaries
// depend on the shapes and the routing only, never on the thread count, and
// each tile is one serial product: results are bitwise the same for any
// number of threads.
//
// The plan holds no storage: item i of items() is computed on the fly (items
// past an expert's last row tile are empty), so one backend serves
// concurrent callers.

#include <algorithm>
#include <vector>

#include "moe/core/config.hpp"

namespace moe::cpu::detail {

struct Tile {
  Index expert, row, rows, col, cols;
};

class TilePlan {
 public:
  // offsets (E + 1): rows of expert e are [offsets[e], offsets[e + 1]); C has n
  // columns. Rows are split into tiles of at most tile_rows when split_rows;
  // columns, while there are fewer than min_tiles tiles, into near-equal
  // tiles that are a multiple of column_align wide.
  TilePlan(const std::vector<Index>& offsets, Index n, bool split_rows, Index min_tiles,
           Index tile_rows, Index column_align)
      : offsets_(&offsets),
        experts_(static_cast<Index>(offsets.size()) - 1),
        n_(n),
        split_rows_(split_rows),
        tile_rows_(tile_rows),
        column_align_(column_align) {
    Index row_tiles = 0;
    for (Index e = 0; e < experts_; ++e) {
      const Index parts = row_parts(e);
      row_tiles += parts;
      max_parts_ = std::max(max_parts_, parts);
    }
    if (row_tiles == 0) return;
    const Index max_col_tiles = std::max<Index>(1, n / column_align);
    col_tiles_ = std::min(max_col_tiles, (min_tiles + row_tiles - 1) / row_tiles);
  }

  // Work items: experts x their largest row-tile count x column tiles.
  Index items() const { return experts_ * max_parts_ * col_tiles_; }

  // Item i as a tile of C; false for an empty item.
  bool tile(Index i, Tile& t) const {
    const Index per_expert = max_parts_ * col_tiles_;
    const Index e = i / per_expert, part = i % per_expert / col_tiles_, c = i % col_tiles_;
    const Index parts = row_parts(e);
    if (part >= parts) return false;
    const Index begin = (*offsets_)[e], rows = (*offsets_)[e + 1] - begin;
    const Index r0 = begin + rows * part / parts, r1 = begin + rows * (part + 1) / parts;
    t = {e, r0, r1 - r0, boundary(c), boundary(c + 1) - boundary(c)};
    return true;
  }

 private:
  // An expert's row tiles.
  Index row_parts(Index e) const {
    const Index rows = (*offsets_)[e + 1] - (*offsets_)[e];
    return rows == 0 ? 0 : split_rows_ ? (rows + tile_rows_ - 1) / tile_rows_ : 1;
  }
  // Column boundary i: n i / col_tiles rounded down to column_align (the last
  // one is n), so tiles differ by at most column_align columns.
  Index boundary(Index i) const {
    return i == col_tiles_ ? n_ : n_ * i / col_tiles_ / column_align_ * column_align_;
  }

  const std::vector<Index>* offsets_;
  Index experts_, n_;
  bool split_rows_;
  Index tile_rows_, column_align_;
  Index max_parts_ = 0, col_tiles_ = 0;
};

}  // namespace moe::cpu::detail
