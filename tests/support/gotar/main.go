// Command gotar prints each tar archive named on the command line as Go's
// archive/tar reads it: the reference hydrafy's tar reader is compared with
// (tests/go_tar.rs). Standard library only, so `go run` needs no network.
//
// For each archive it prints "archive PATH", then one line per entry
// ("entry ..." or, for a global PAX header, "global name=..."), then
// "error MESSAGE" if reading failed, then "end". Byte strings are printed
// with every byte outside '!'..'~' (and the backslash) as \xHH, the same
// escaping the Rust side uses.
package main

import (
	"archive/tar"
	"bufio"
	"fmt"
	"io"
	"os"
	"time"
)

func esc(s string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c > ' ' && c <= '~' && c != '\\' {
			out = append(out, c)
		} else {
			out = append(out, fmt.Sprintf("\\x%02x", c)...)
		}
	}
	return string(out)
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return fmt.Sprintf("%d.%09d", t.Unix(), t.Nanosecond())
}

func list(w *bufio.Writer, path string) {
	fmt.Fprintf(w, "archive %s\n", path)
	defer fmt.Fprintln(w, "end")
	f, err := os.Open(path)
	if err != nil {
		fmt.Fprintf(w, "error %v\n", err)
		return
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			fmt.Fprintf(w, "error %v\n", err)
			return
		}
		if h.Typeflag == tar.TypeXGlobalHeader {
			fmt.Fprintf(w, "global name=%s\n", esc(h.Name))
		} else {
			fmt.Fprintf(w, "entry name=%s type=%d size=%d link=%s mode=%d uid=%d gid=%d uname=%s gname=%s mtime=%s atime=%s ctime=%s dev=%d,%d\n",
				esc(h.Name), h.Typeflag, h.Size, esc(h.Linkname), h.Mode, h.Uid, h.Gid,
				esc(h.Uname), esc(h.Gname), stamp(h.ModTime), stamp(h.AccessTime),
				stamp(h.ChangeTime), h.Devmajor, h.Devminor)
		}
		if _, err := io.Copy(io.Discard, tr); err != nil {
			fmt.Fprintf(w, "error %v\n", err)
			return
		}
	}
}

func main() {
	w := bufio.NewWriter(os.Stdout)
	defer w.Flush()
	for _, path := range os.Args[1:] {
		list(w, path)
	}
}
