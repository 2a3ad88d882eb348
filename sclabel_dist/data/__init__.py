"""The read side of the cell store: store readers, pure partition / shuffle / tokenise, streaming dataset."""
