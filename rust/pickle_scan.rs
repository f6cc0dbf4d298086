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
//! Stack items are `depth << 1 | is_global`; a mark is a saved stack length.

/// Why a pickle was refused, with the byte offset of the opcode.
pub type ScanResult = std::result::Result<(), String>;

/// Refuses a pickle whose loading could exhaust memory or the C stack.
///
/// Checks every opcode up to `STOP`: argument lengths within `data`, memo indices no larger than
/// `data`, nesting depth at most `max_depth`, no `BUILD` onto a global, no out-of-band buffers
/// or extension codes.
pub fn scan_pickle(data: &[u8], max_depth: u64) -> ScanResult {
    let n = data.len();
    let mut stack: Vec<u64> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    // memo index -> stack item (u64::MAX: unset); indices are at most n, so at most 8n bytes
    let mut memo: Vec<u64> = Vec::new();
    let mut memo_len = 0u64;
    // end of the current FRAME: the C unpickler reading from a file skips ahead (parsing other
    // bytes than this scan) when a frame starts inside another or an opcode crosses a frame's
    // end, so both are refused (as Python's own `_Unframer` refuses them; real pickles obey)
    let mut frame_end: Option<usize> = None;
    let mut i = 0usize;
    let bad = |what: &str, at: usize| Err(format!("{what} (byte {at})"));
    let fence = |marks: &Vec<usize>| marks.last().copied().unwrap_or(0);
    loop {
        let Some(&op) = data.get(i) else {
            return bad("truncated (no STOP)", i);
        };
        let at = i;
        i += 1;
        // --- argument
        let arg_start = i;
        let need = |i: usize, k: usize| -> std::result::Result<usize, String> {
            match i.checked_add(k) {
                Some(end) if end <= n => Ok(end),
                _ => Err(format!(
                    "opcode 0x{op:02x} runs past the end of the data (byte {at})"
                )),
            }
        };
        let le = |bytes: &[u8]| {
            bytes
                .iter()
                .rev()
                .fold(0u64, |acc, &b| acc << 8 | u64::from(b))
        };
        let line = |i: usize| -> std::result::Result<usize, String> {
            match data[i.min(n)..].iter().position(|&b| b == b'\n') {
                Some(p) => Ok(i + p + 1),
                None => Err(format!("unterminated argument of 0x{op:02x} (byte {at})")),
            }
        };
        match op {
            // fixed-size arguments
            b'J' | b'j' | b'r' | b'\x84' => i = need(i, 4)?,
            b'K' | b'h' | b'q' | b'\x82' | b'\x80' => i = need(i, 1)?,
            b'M' | b'\x83' => i = need(i, 2)?,
            b'G' | b'\x95' => i = need(i, 8)?,
            // newline-terminated arguments
            b'I' | b'L' | b'S' | b'V' | b'F' | b'g' | b'p' | b'P' => i = line(i)?,
            b'c' | b'i' => i = line(line(i)?)?,
            // length-prefixed arguments
            b'\x8a' | b'U' | b'C' | b'\x8c' => {
                let end = need(i, 1)?;
                i = need(end, usize::from(data[i]))?;
            }
            b'\x8b' | b'T' => {
                let end = need(i, 4)?;
                let len = i32::from_le_bytes(data[i..end].try_into().expect("4 bytes"));
                if len < 0 {
                    return bad("negative length", at);
                }
                i = need(end, len as usize)?;
            }
            b'B' | b'X' => {
                let end = need(i, 4)?;
                let len = le(&data[i..end]);
                i = need(end, usize::try_from(len).unwrap_or(usize::MAX))?;
            }
            b'\x8e' | b'\x8d' | b'\x96' => {
                let end = need(i, 8)?;
                let len = le(&data[i..end]);
                i = need(end, usize::try_from(len).unwrap_or(usize::MAX))?;
            }
            _ => {}
        }
        let arg = &data[arg_start..i];
        if let Some(end) = frame_end {
            if at >= end {
                frame_end = None;
            } else if i > end || op == b'\x95' {
                return bad("opcode or frame crossing the end of a frame", at);
            }
        }
        if op == b'\x95' {
            let len = usize::try_from(le(arg)).unwrap_or(usize::MAX);
            frame_end = Some(need(i, len)?);
        }
        // --- effect on the stack
        let depth_of = |items: &[u64]| 1 + items.iter().map(|d| d >> 1).max().unwrap_or(0);
        // depth of the k items on top (None: fewer above the mark), which are removed
        let pop_depth = |stack: &mut Vec<u64>, k: usize, marks: &Vec<usize>| {
            if stack.len() < fence(marks) + k {
                return None;
            }
            let start = stack.len() - k;
            let depth = depth_of(&stack[start..]);
            let second = stack.get(start + 1).copied().unwrap_or(0);
            stack.truncate(start);
            Some((depth, second))
        };
        match op {
            // scalars
            b'I' | b'J' | b'K' | b'M' | b'L' | b'\x8a' | b'\x8b' | b'S' | b'T' | b'U' | b'B'
            | b'C' | b'\x8e' | b'\x96' | b'N' | b'\x88' | b'\x89' | b'V' | b'\x8c' | b'X'
            | b'\x8d' | b'F' | b'G' => stack.push(0),
            // empty containers
            b']' | b')' | b'}' | b'\x8f' => stack.push(2),
            b'(' => marks.push(stack.len()),
            // LIST TUPLE DICT FROZENSET INST OBJ APPENDS SETITEMS ADDITEMS POP_MARK
            b'l' | b't' | b'd' | b'\x91' | b'i' | b'o' | b'e' | b'u' | b'\x90' | b'1' => {
                let Some(k) = marks.pop() else {
                    return bad("no MARK", at);
                };
                let k = k.min(stack.len());
                let depth = depth_of(&stack[k..]);
                stack.truncate(k);
                if op == b'1' {
                    continue;
                }
                if depth > max_depth {
                    return bad(&format!("nested deeper than {max_depth}"), at);
                }
                if matches!(op, b'e' | b'u' | b'\x90') {
                    if stack.len() <= fence(&marks) {
                        return bad("stack underflow", at);
                    }
                    let top = stack.last_mut().expect("checked");
                    *top = (*top >> 1).max(depth) << 1 | (*top & 1);
                } else {
                    stack.push(depth << 1);
                }
            }
            b'g' | b'h' | b'j' => {
                let idx = if op == b'g' {
                    decimal(arg)
                } else {
                    Some(le(arg))
                };
                let v = idx
                    .and_then(|k| usize::try_from(k).ok())
                    .and_then(|k| memo.get(k).copied())
                    .unwrap_or(u64::MAX);
                if v == u64::MAX {
                    return bad("memo key missing", at);
                }
                stack.push(v);
            }
            b'p' | b'q' | b'r' | b'\x94' => {
                let idx = match op {
                    b'p' => decimal(arg),
                    b'\x94' => Some(memo_len),
                    _ => Some(le(arg)),
                };
                let Some(idx) = idx.filter(|&k| k <= n as u64) else {
                    return bad(&format!("memo index beyond a {n}-byte pickle"), at);
                };
                if stack.len() <= fence(&marks) {
                    return bad("stack underflow", at);
                }
                let idx = idx as usize; // <= n
                if idx >= memo.len() {
                    memo.resize(idx + 1, u64::MAX);
                }
                if memo[idx] == u64::MAX {
                    memo_len += 1;
                }
                memo[idx] = *stack.last().expect("checked");
            }
            b'c' => stack.push(1),
            b'P' => stack.push(2),
            b'0' => {
                if stack.len() > fence(&marks) {
                    stack.pop();
                } else if marks.pop().is_none() {
                    return bad("stack underflow", at);
                }
            }
            b'2' => {
                if stack.len() <= fence(&marks) {
                    return bad("stack underflow", at);
                }
                stack.push(*stack.last().expect("checked"));
            }
            // TUPLE1-3 STACK_GLOBAL NEWOBJ NEWOBJ_EX REDUCE BINPERSID APPEND SETITEM BUILD
            b'\x85' | b'\x86' | b'\x87' | b'\x93' | b'\x81' | b'\x92' | b'R' | b'Q' | b'a'
            | b's' | b'b' => {
                let k = match op {
                    b'\x85' | b'Q' | b'a' | b'b' => 1,
                    b'\x86' | b'\x93' | b'\x81' | b'R' | b's' => 2,
                    _ => 3,
                };
                let Some((depth, args)) = pop_depth(&mut stack, k, &marks) else {
                    return bad("stack underflow", at);
                };
                // REDUCE: the result holds at most its arguments, one level deeper
                let depth = if op == b'R' { 1 + (args >> 1) } else { depth };
                if depth > max_depth {
                    return bad(&format!("nested deeper than {max_depth}"), at);
                }
                match op {
                    b'a' | b's' | b'b' => {
                        if stack.len() <= fence(&marks) {
                            return bad("stack underflow", at);
                        }
                        let top = stack.last_mut().expect("checked");
                        if op == b'b' && *top & 1 == 1 {
                            return bad("BUILD onto a global", at);
                        }
                        *top = (*top >> 1).max(depth) << 1 | (*top & 1);
                    }
                    b'\x93' => stack.push(1),
                    _ => stack.push(depth << 1),
                }
            }
            b'.' => return Ok(()),
            b'\x80' | b'\x95' => {}
            b'\x82' | b'\x83' | b'\x84' | b'\x97' | b'\x98' => {
                return bad(&format!("unsupported opcode 0x{op:02x}"), at)
            }
            _ => return bad(&format!("unknown opcode 0x{op:02x}"), at),
        }
    }
}

/// A decimal memo index (`GET`/`PUT` text argument, newline included); None if malformed.
fn decimal(arg: &[u8]) -> Option<u64> {
    let digits = arg.strip_suffix(b"\n")?;
    std::str::from_utf8(digits).ok()?.trim().parse().ok()
}
