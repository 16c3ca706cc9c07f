package main

import (
	"fmt"
	"image/color"
	"os"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// wayColors: one colour per way, in allWays order.
var wayColors = []color.Color{
	color.RGBA{0x88, 0x88, 0x88, 0xff}, // baseline
	color.RGBA{0xe4, 0x1a, 0x1c, 0xff}, // init
	color.RGBA{0x37, 0x7e, 0xb8, 0xff}, // image volume docker
	color.RGBA{0x98, 0x4e, 0xa3, 0xff}, // image volume cncf
	color.RGBA{0x4d, 0xaf, 0x4a, 0xff}, // csi docker
	color.RGBA{0xff, 0x7f, 0x00, 0xff}, // csi cncf
}

func colorOf(w way) color.Color {
	for i, a := range allWays {
		if a.key == w.key {
			return wayColors[i%len(wayColors)]
		}
	}
	return color.Black
}

// writeChart draws, for each module size (rows) and cold/warm (columns),
// the median over repetitions of the pods' creation-to-Ready p50, one bar
// per way for each N (the spread over repetitions is in the table). A way
// whose pods did not start has no bar and says so in the legend.
func writeChart(path string, groups []group, machine string) error {
	var sizes []int64
	var modes []string
	var counts []int
	var ways []way
	seen := map[string]bool{}
	for _, g := range groups {
		if k := fmt.Sprint("s", g.size); !seen[k] {
			seen[k] = true
			sizes = append(sizes, g.size)
		}
		if k := "m" + g.mode; !seen[k] {
			seen[k] = true
			modes = append(modes, g.mode)
		}
		if k := fmt.Sprint("n", g.n); !seen[k] {
			seen[k] = true
			counts = append(counts, g.n)
		}
		if k := "w" + g.way.key; !seen[k] {
			seen[k] = true
			ways = append(ways, g.way)
		}
	}
	if len(groups) == 0 {
		return fmt.Errorf("no results to draw")
	}
	find := func(size int64, mode string, n int, w way) *group {
		for i := range groups {
			g := &groups[i]
			if g.size == size && g.mode == mode && g.n == n && g.way.key == w.key {
				return g
			}
		}
		return nil
	}

	rows := make([][]*plot.Plot, len(sizes))
	barWidth := vg.Points(float64(int(200/float64(len(ways)+1))) / float64(len(counts)) * 1.6)
	if barWidth > vg.Points(18) {
		barWidth = vg.Points(18)
	}
	for i, size := range sizes {
		rows[i] = make([]*plot.Plot, len(modes))
		for j, mode := range modes {
			p := plot.New()
			p.Title.Text = fmt.Sprintf("%s module, %s node", sizeLabel(size), mode)
			p.Y.Label.Text = "pod creation to Ready, p50 (s)"
			p.X.Label.Text = "pods created at once (N)"
			p.Y.Min = 0
			p.Legend.Top = true
			p.Legend.Left = true
			p.Legend.TextStyle.Font.Size = vg.Points(7)
			var names []string
			for _, n := range counts {
				names = append(names, fmt.Sprint(n))
			}
			for k, w := range ways {
				vals := make(plotter.Values, len(counts))
				any := false
				for c, n := range counts {
					g := find(size, mode, n, w)
					if g == nil || g.readyP50.n == 0 {
						continue
					}
					any = true
					vals[c] = g.readyP50.med
				}
				bars, err := plotter.NewBarChart(vals, barWidth)
				if err != nil {
					return err
				}
				bars.Color = colorOf(w)
				bars.LineStyle.Width = 0
				bars.Offset = barWidth * vg.Length(float64(k)-float64(len(ways)-1)/2)
				p.Add(bars)
				label := w.label
				if !any {
					label += ": did not start"
				}
				p.Legend.Add(label, bars)
			}
			p.NominalX(names...)
			// Room above the bars for the legend.
			p.Y.Max *= 1.4
			rows[i][j] = p
		}
	}

	const w, h = 11 * vg.Inch, 8.5 * vg.Inch
	img := vgimg.NewWith(vgimg.UseWH(w, h), vgimg.UseDPI(110))
	dc := draw.New(img)
	title := strings.SplitN(machine, "\n", 3)
	head := "wasm-csi cluster benchmark: " + title[0]
	if len(title) > 1 {
		head += "; " + title[1]
	}
	// A strip for the title, the plots below it.
	top := draw.Crop(dc, 0, 0, 0, -vg.Points(24))
	dc.FillText(draw.TextStyle{Color: color.Black, Font: font.From(plot.DefaultFont, vg.Points(9)), XAlign: draw.XLeft, YAlign: draw.YCenter, Handler: plot.DefaultTextHandler},
		vg.Point{X: vg.Points(8), Y: h - vg.Points(16)}, head)
	tiles := draw.Tiles{Rows: len(sizes), Cols: len(modes), PadX: vg.Points(12), PadY: vg.Points(12), PadTop: vg.Points(4), PadBottom: vg.Points(4), PadLeft: vg.Points(4), PadRight: vg.Points(8)}
	canvases := plot.Align(rows, tiles, top)
	for i := range rows {
		for j := range rows[i] {
			rows[i][j].Draw(canvases[i][j])
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
