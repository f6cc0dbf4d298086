//! A bounds check of a pickle, run before Python's C unpickler loads it.
//!
//! The core never *interprets* pickles (Python's restricted unpickler does, in
//! `python/fastckpt/unpickle/`), but the C unpickler trusts its input in ways that cost
//! memory or the C stack: `LONG_BINPUT` with a huge index resizes the memo to that index, a
//! length-prefixed string is allocated before it is read, and hashing a tuple nested a million
//! deep (one byte per level) recurses in C until the process dies. One pass over the opcodes,
//! simulating the stack as nesting depths, refuses such input before anything is built. It also
//! refuses `BUILD` onto a global (a stand-in shared by every call), out-of-band buffers and the
//! copyreg extension registry. It runs in Rust because it must not slow down loading a
//! multi-megabyte DCP `.metadata` (a Python loop over every opcode would double the load time).
//!
//! Stack items are `depth << 1 | is_global`; a mark is a saved stack length. [`scan_pickle`] reads
//! each opcode's argument (`Scanner::arg_end`), checks the framing (`Scanner::check_frame`), then
//! applies the opcode's effect on the stack (`Scanner::apply`).

/// Why a pickle was refused, with the byte offset of the opcode.
pub type ScanResult = std::result::Result<(), String>;

/// Refuses a pickle whose loading could exhaust memory or the C stack.
///
/// Checks every opcode up to `STOP`: argument lengths within `data`, memo indices no larger than
/// `data`, nesting depth at most `max_depth`, no `BUILD` onto a global, no out-of-band buffers
/// or extension codes.
pub fn scan_pickle(data: &[u8], max_depth: u64) -> ScanResult {
    let mut s = Scanner {
        data,
        max_depth,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Vec::new(),
        memo_len: 0,
        frame_end: None,
    };
    let mut i = 0usize;
    loop {
        let Some(&op) = data.get(i) else {
            return bad("truncated (no STOP)", i);
        };
        let at = i;
        let arg_start = i + 1;
        i = s.arg_end(op, at, arg_start)?;
        let arg = &data[arg_start..i];
        s.check_frame(op, at, arg, i)?;
        if s.apply(op, arg, at)? {
            return Ok(());
        }
    }
}

/// The state of one scan: the simulated stack, marks and memo, and the current frame.
struct Scanner<'a> {
    data: &'a [u8],
    max_depth: u64,
    stack: Vec<u64>,
    marks: Vec<usize>,
    /// memo index -> stack item (u64::MAX: unset); indices are at most n, so at most 8n bytes
    memo: Vec<u64>,
    memo_len: u64,
    /// end of the current FRAME: the C unpickler reading from a file skips ahead (parsing other
    /// bytes than this scan) when a frame starts inside another or an opcode crosses a frame's
    /// end, so both are refused (as Python's own `_Unframer` refuses them; real pickles obey)
    frame_end: Option<usize>,
}

/// `Err` with what is wrong and the byte offset of the opcode.
fn bad<T>(what: &str, at: usize) -> std::result::Result<T, String> {
    Err(format!("{what} (byte {at})"))
}

/// A little-endian unsigned integer.
fn le(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0u64, |acc, &b| acc << 8 | u64::from(b))
}

/// Nesting depth of a container holding `items`.
fn depth_of(items: &[u64]) -> u64 {
    1 + items.iter().map(|d| d >> 1).max().unwrap_or(0)
}

impl Scanner<'_> {
    /// Stack length at the innermost mark: items below it are out of reach.
    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    /// `i + k`, if that is within the data (the end of a `k`-byte argument of `op` at `i`).
    fn need(&self, op: u8, at: usize, i: usize, k: usize) -> std::result::Result<usize, String> {
        match i.checked_add(k) {
            Some(end) if end <= self.data.len() => Ok(end),
            _ => Err(format!(
                "opcode 0x{op:02x} runs past the end of the data (byte {at})"
            )),
        }
    }

    /// The end of a newline-terminated argument of `op` starting at `i` (newline included).
    fn line(&self, op: u8, at: usize, i: usize) -> std::result::Result<usize, String> {
        let n = self.data.len();
        match self.data[i.min(n)..].iter().position(|&b| b == b'\n') {
            Some(p) => Ok(i + p + 1),
            None => Err(format!("unterminated argument of 0x{op:02x} (byte {at})")),
        }
    }

    /// The end of the argument of opcode `op` (at `at`), which starts at `i`.
    fn arg_end(&self, op: u8, at: usize, i: usize) -> std::result::Result<usize, String> {
        let data = self.data;
        let need = |i: usize, k: usize| self.need(op, at, i, k);
        let line = |i: usize| self.line(op, at, i);
        Ok(match op {
            // fixed-size arguments
            b'J' | b'j' | b'r' | b'\x84' => need(i, 4)?,
            b'K' | b'h' | b'q' | b'\x82' | b'\x80' => need(i, 1)?,
            b'M' | b'\x83' => need(i, 2)?,
            b'G' | b'\x95' => need(i, 8)?,
            // newline-terminated arguments
            b'I' | b'L' | b'S' | b'V' | b'F' | b'g' | b'p' | b'P' => line(i)?,
            b'c' | b'i' => line(line(i)?)?,
            // length-prefixed arguments
            b'\x8a' | b'U' | b'C' | b'\x8c' => {
                let end = need(i, 1)?;
                need(end, usize::from(data[i]))?
            }
            b'\x8b' | b'T' => {
                let end = need(i, 4)?;
                let len = i32::from_le_bytes(data[i..end].try_into().expect("4 bytes"));
                if len < 0 {
                    return bad("negative length", at);
                }
                need(end, len as usize)?
            }
            b'B' | b'X' => {
                let end = need(i, 4)?;
                let len = le(&data[i..end]);
                need(end, usize::try_from(len).unwrap_or(usize::MAX))?
            }
            b'\x8e' | b'\x8d' | b'\x96' => {
                let end = need(i, 8)?;
                let len = le(&data[i..end]);
                need(end, usize::try_from(len).unwrap_or(usize::MAX))?
            }
            _ => i,
        })
    }

    /// Leaves a frame that ended before `at`, refuses an opcode (`op` with argument `arg`,
    /// ending at `end`) that crosses the current frame's end or a FRAME inside a frame, and
    /// enters the frame that a FRAME opcode announces.
    fn check_frame(
        &mut self,
        op: u8,
        at: usize,
        arg: &[u8],
        end: usize,
    ) -> std::result::Result<(), String> {
        if let Some(frame_end) = self.frame_end {
            if at >= frame_end {
                self.frame_end = None;
            } else if end > frame_end || op == b'\x95' {
                return bad("opcode or frame crossing the end of a frame", at);
            }
        }
        if op == b'\x95' {
            let len = usize::try_from(le(arg)).unwrap_or(usize::MAX);
            self.frame_end = Some(self.need(op, at, end, len)?);
        }
        Ok(())
    }

    /// Applies the effect of opcode `op` (at `at`, with argument `arg`) on the stack; `true` at
    /// `STOP`.
    fn apply(&mut self, op: u8, arg: &[u8], at: usize) -> std::result::Result<bool, String> {
        match op {
            // scalars
            b'I' | b'J' | b'K' | b'M' | b'L' | b'\x8a' | b'\x8b' | b'S' | b'T' | b'U' | b'B'
            | b'C' | b'\x8e' | b'\x96' | b'N' | b'\x88' | b'\x89' | b'V' | b'\x8c' | b'X'
            | b'\x8d' | b'F' | b'G' => self.stack.push(0),
            // empty containers
            b']' | b')' | b'}' | b'\x8f' => self.stack.push(2),
            b'(' => self.marks.push(self.stack.len()),
            // LIST TUPLE DICT FROZENSET INST OBJ APPENDS SETITEMS ADDITEMS POP_MARK
            b'l' | b't' | b'd' | b'\x91' | b'i' | b'o' | b'e' | b'u' | b'\x90' | b'1' => {
                self.close_mark(op, at)?
            }
            b'g' | b'h' | b'j' => self.memo_get(op, arg, at)?,
            b'p' | b'q' | b'r' | b'\x94' => self.memo_put(op, arg, at)?,
            b'c' => self.stack.push(1),
            b'P' => self.stack.push(2),
            b'0' => {
                if self.stack.len() > self.fence() {
                    self.stack.pop();
                } else if self.marks.pop().is_none() {
                    return bad("stack underflow", at);
                }
            }
            b'2' => {
                if self.stack.len() <= self.fence() {
                    return bad("stack underflow", at);
                }
                self.stack.push(*self.stack.last().expect("checked"));
            }
            // TUPLE1-3 STACK_GLOBAL NEWOBJ NEWOBJ_EX REDUCE BINPERSID APPEND SETITEM BUILD
            b'\x85' | b'\x86' | b'\x87' | b'\x93' | b'\x81' | b'\x92' | b'R' | b'Q' | b'a'
            | b's' | b'b' => self.combine(op, at)?,
            b'.' => return Ok(true),
            b'\x80' | b'\x95' => {}
            b'\x82' | b'\x83' | b'\x84' | b'\x97' | b'\x98' => {
                return bad(&format!("unsupported opcode 0x{op:02x}"), at)
            }
            _ => return bad(&format!("unknown opcode 0x{op:02x}"), at),
        }
        Ok(false)
    }

    /// An opcode that takes the items above the innermost mark: builds a container of them, adds
    /// them to the container below (APPENDS, SETITEMS, ADDITEMS), or drops them (POP_MARK).
    fn close_mark(&mut self, op: u8, at: usize) -> std::result::Result<(), String> {
        let Some(k) = self.marks.pop() else {
            return bad("no MARK", at);
        };
        let k = k.min(self.stack.len());
        let depth = depth_of(&self.stack[k..]);
        self.stack.truncate(k);
        if op == b'1' {
            return Ok(());
        }
        if depth > self.max_depth {
            return bad(&format!("nested deeper than {}", self.max_depth), at);
        }
        if matches!(op, b'e' | b'u' | b'\x90') {
            if self.stack.len() <= self.fence() {
                return bad("stack underflow", at);
            }
            let top = self.stack.last_mut().expect("checked");
            *top = (*top >> 1).max(depth) << 1 | (*top & 1);
        } else {
            self.stack.push(depth << 1);
        }
        Ok(())
    }

    /// GET, BINGET, LONG_BINGET: pushes a memoised item, which must be set.
    fn memo_get(&mut self, op: u8, arg: &[u8], at: usize) -> std::result::Result<(), String> {
        let idx = if op == b'g' {
            decimal(arg)
        } else {
            Some(le(arg))
        };
        let v = idx
            .and_then(|k| usize::try_from(k).ok())
            .and_then(|k| self.memo.get(k).copied())
            .unwrap_or(u64::MAX);
        if v == u64::MAX {
            return bad("memo key missing", at);
        }
        self.stack.push(v);
        Ok(())
    }

    /// PUT, BINPUT, LONG_BINPUT, MEMOIZE: memoises the top item at an index no larger than the
    /// pickle.
    fn memo_put(&mut self, op: u8, arg: &[u8], at: usize) -> std::result::Result<(), String> {
        let n = self.data.len();
        let idx = match op {
            b'p' => decimal(arg),
            b'\x94' => Some(self.memo_len),
            _ => Some(le(arg)),
        };
        let Some(idx) = idx.filter(|&k| k <= n as u64) else {
            return bad(&format!("memo index beyond a {n}-byte pickle"), at);
        };
        if self.stack.len() <= self.fence() {
            return bad("stack underflow", at);
        }
        let idx = idx as usize; // <= n
        if idx >= self.memo.len() {
            self.memo.resize(idx + 1, u64::MAX);
        }
        if self.memo[idx] == u64::MAX {
            self.memo_len += 1;
        }
        self.memo[idx] = *self.stack.last().expect("checked");
        Ok(())
    }

    /// Depth of the `k` items on top (None: fewer above the mark), which are removed, and the
    /// second of them.
    fn pop_depth(&mut self, k: usize) -> Option<(u64, u64)> {
        if self.stack.len() < self.fence() + k {
            return None;
        }
        let start = self.stack.len() - k;
        let depth = depth_of(&self.stack[start..]);
        let second = self.stack.get(start + 1).copied().unwrap_or(0);
        self.stack.truncate(start);
        Some((depth, second))
    }

    /// An opcode that takes a fixed number of items: builds a tuple, global or object of them
    /// (TUPLE1-3, STACK_GLOBAL, NEWOBJ, NEWOBJ_EX, REDUCE, BINPERSID), or adds them to the item
    /// below (APPEND, SETITEM, BUILD).
    fn combine(&mut self, op: u8, at: usize) -> std::result::Result<(), String> {
        let k = match op {
            b'\x85' | b'Q' | b'a' | b'b' => 1,
            b'\x86' | b'\x93' | b'\x81' | b'R' | b's' => 2,
            _ => 3,
        };
        let Some((depth, args)) = self.pop_depth(k) else {
            return bad("stack underflow", at);
        };
        // REDUCE: the result holds at most its arguments, one level deeper
        let depth = if op == b'R' { 1 + (args >> 1) } else { depth };
        if depth > self.max_depth {
            return bad(&format!("nested deeper than {}", self.max_depth), at);
        }
        match op {
            b'a' | b's' | b'b' => {
                if self.stack.len() <= self.fence() {
                    return bad("stack underflow", at);
                }
                let top = self.stack.last_mut().expect("checked");
                if op == b'b' && *top & 1 == 1 {
                    return bad("BUILD onto a global", at);
                }
                *top = (*top >> 1).max(depth) << 1 | (*top & 1);
            }
            b'\x93' => self.stack.push(1),
            _ => self.stack.push(depth << 1),
        }
        Ok(())
    }
}

/// A decimal memo index (`GET`/`PUT` text argument, newline included); None if malformed.
fn decimal(arg: &[u8]) -> Option<u64> {
    let digits = arg.strip_suffix(b"\n")?;
    std::str::from_utf8(digits).ok()?.trim().parse().ok()
}
